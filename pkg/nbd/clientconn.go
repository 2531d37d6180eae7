package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// conn is one connection in transmission.
type conn struct {
	info    ExportInfo
	raw     net.Conn
	nc      net.Conn
	br      *bufio.Reader
	fw      *frameWriter
	timeout time.Duration
	onLost  func(*conn, error)

	wsem    chan struct{} // write lock that a waiter can give up on
	writers atomic.Int32  // requests between wanting wsem and leaving it

	mu       sync.Mutex
	pending  map[uint64]*call
	cookie   uint64
	err      error // first fatal error; no new calls once set
	done     chan struct{}
	inflight sync.WaitGroup
}

// call is one request in flight. Its reply assembly fields belong to the
// reader goroutine. The caller's read buffer is written by the reader
// only under mu and only while the call is not abandoned, so a caller
// that gave up (timeout, cancellation) can reuse its buffer at once.
type call struct {
	req Request

	mu        sync.Mutex
	buf       []byte
	abandoned bool

	spans   []span // byte ranges of content chunks received, sorted
	got     uint64
	err     error // first error chunk
	extents []Extent

	done   chan struct{}
	result error
}

type span struct{ start, end uint64 }

func (c *call) abandon() {
	c.mu.Lock()
	c.abandoned = true
	c.mu.Unlock()
}

func newConn(raw, nc net.Conn, br *bufio.Reader, info ExportInfo, timeout time.Duration, onLost func(*conn, error)) *conn {
	return &conn{
		info: info, raw: raw, nc: nc, br: br, fw: newFrameWriter(nc), timeout: timeout, onLost: onLost,
		wsem: make(chan struct{}, 1), pending: map[uint64]*call{}, done: make(chan struct{}),
	}
}

func (c *conn) start() { go c.readLoop() }

// kill ends the connection with err as the reason; the reader notices,
// fails what is pending and reports the loss.
func (c *conn) kill(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.raw.Close()
}

// submit registers a request and writes it. The call completes through
// wait.
func (c *conn) submit(ctx context.Context, req Request, payload, dst []byte) (*call, error) {
	cl := &call{req: req, buf: dst, done: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("%w: %w", ErrDisconnected, err)
	}
	c.cookie++
	cl.req.Cookie = c.cookie
	c.pending[cl.req.Cookie] = cl
	c.inflight.Add(1)
	c.mu.Unlock()

	c.writers.Add(1)
	select {
	case c.wsem <- struct{}{}:
	case <-cl.done:
		c.leaveWriters()
		return nil, cl.result
	case <-ctx.Done():
		c.leaveWriters()
		c.forget(cl)
		return nil, ctx.Err()
	}
	var hdr [requestSize]byte
	c.raw.SetWriteDeadline(time.Now().Add(c.timeout))
	err := c.fw.write(AppendRequest(hdr[:0], cl.req), payload)
	if c.writers.Add(-1) == 0 && err == nil {
		// Nobody else is about to write: push what is buffered, ours
		// and that of writers who left it to us.
		err = c.fw.flush()
	}
	<-c.wsem
	if err != nil {
		// A request half written leaves the stream unusable.
		c.kill(fmt.Errorf("send %v: %w", req.Command, err))
	}
	return cl, nil
}

// leaveWriters is for a request that wanted to write but gave up: if it
// was the last one counted, an earlier writer left its bytes for it to
// flush.
func (c *conn) leaveWriters() {
	if c.writers.Add(-1) == 0 {
		go func() {
			select {
			case c.wsem <- struct{}{}:
			case <-c.done:
				return
			}
			if c.writers.Load() == 0 {
				if err := c.fw.flush(); err != nil {
					c.kill(fmt.Errorf("flush requests: %w", err))
				}
			}
			<-c.wsem
		}()
	}
}

// forget removes a call that was never sent.
func (c *conn) forget(cl *call) {
	c.mu.Lock()
	if _, ok := c.pending[cl.req.Cookie]; ok {
		delete(c.pending, cl.req.Cookie)
		c.inflight.Done()
	}
	c.mu.Unlock()
}

// wait returns the call's result, or gives up on it at ctx's end or the
// deadline; a call given up on stays registered until its reply comes
// (its cookie is never reused), and the connection goes on.
func (c *conn) wait(ctx context.Context, cl *call, deadline time.Time) error {
	select {
	case <-cl.done:
		return cl.result
	default:
	}
	start := time.Now()
	t := time.NewTimer(deadline.Sub(start))
	defer t.Stop()
	select {
	case <-cl.done:
		return cl.result
	case <-ctx.Done():
		cl.abandon()
		return ctx.Err()
	case <-t.C:
		cl.abandon()
		return fmt.Errorf("%v: no reply after %v: %w", cl.req.Command, time.Since(start).Round(time.Millisecond), context.DeadlineExceeded)
	}
}

// disconnect waits up to timeout for the calls in flight, then sends
// NBD_CMD_DISC and closes.
func (c *conn) disconnect(timeout time.Duration) {
	// No new calls first: inflight only falls from here.
	c.mu.Lock()
	if c.err == nil {
		c.err = ErrClosed
	}
	c.mu.Unlock()
	idle := make(chan struct{})
	go func() {
		c.inflight.Wait()
		close(idle)
	}()
	t := time.NewTimer(timeout)
	select {
	case <-idle:
	case <-c.done:
	case <-t.C:
	}
	t.Stop()
	select {
	case c.wsem <- struct{}{}:
		c.raw.SetWriteDeadline(time.Now().Add(time.Second))
		if c.fw.write(AppendRequest(nil, Request{Command: CmdDisc}), nil) == nil {
			c.fw.flush()
		}
		<-c.wsem
	case <-c.done:
	}
	if tc, ok := c.nc.(*tls.Conn); ok {
		tc.CloseWrite()
	}
	c.raw.Close()
	<-c.done
}

func (c *conn) readLoop() {
	var err error
	for err == nil {
		var h ReplyHeader
		if h, err = ReadReplyHeader(c.br); err == nil {
			err = c.reply(h)
		}
	}
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	err = c.err
	pending := c.pending
	c.pending = nil
	c.mu.Unlock()
	c.raw.Close()
	lostErr := err
	if !errors.Is(err, ErrFenced) {
		// %w twice: the client resends requests that ErrDisconnected
		// alone explains, not those of a server that broke the protocol.
		lostErr = fmt.Errorf("%w: connection lost: %w", ErrDisconnected, err)
	}
	for _, cl := range pending {
		c.complete(cl, lostErr)
	}
	close(c.done)
	if c.onLost != nil {
		c.onLost(c, err)
	}
}

// complete hands the call its result. Only the reader calls it, so the
// caller's buffer is never written after the caller returns.
func (c *conn) complete(cl *call, err error) {
	cl.result = err
	close(cl.done)
	c.inflight.Done()
}

// maxChunkPayload bounds chunks that carry no read data (errors, block
// status), which are copied into memory.
const maxChunkPayload = 1 << 20

// reply consumes one reply header and its payload. An error ends the
// connection: the stream can no longer be trusted.
func (c *conn) reply(h ReplyHeader) error {
	c.mu.Lock()
	cl := c.pending[h.Cookie]
	c.mu.Unlock()
	if cl == nil {
		return protoErrorf("reply for cookie %d, which is not in flight", h.Cookie)
	}
	q := cl.req
	if !h.Structured {
		if h.Errno != 0 {
			return c.finish(cl, &RequestError{Errno: normErrno(h.Errno)})
		}
		if q.Command == CmdRead {
			if c.info.Structured {
				return protoErrorf("simple reply to %v after structured replies were negotiated", q.Command)
			}
			if err := c.readData(cl, 0, uint64(q.Length)); err != nil {
				return err
			}
		}
		if q.Command == CmdBlockStatus {
			return protoErrorf("simple reply to %v", q.Command)
		}
		return c.finish(cl, nil)
	}
	if !c.info.Structured {
		return protoErrorf("structured reply chunk without negotiation")
	}
	switch {
	case h.Type == ChunkNone:
		if h.Length != 0 || !h.Done() {
			return protoErrorf("%v of length %d, flags %#x", h.Type, h.Length, h.Flags)
		}
	case h.Type == ChunkOffsetData && q.Command == CmdRead:
		if h.Length < 9 {
			return protoErrorf("%v of length %d", h.Type, h.Length)
		}
		var b [8]byte
		if err := readFull(c.br, b[:]); err != nil {
			return unexpected(err)
		}
		start := be.Uint64(b[:])
		if err := cl.claim(start, uint64(h.Length-8)); err != nil {
			return err
		}
		if err := c.readData(cl, start-q.Offset, uint64(h.Length-8)); err != nil {
			return err
		}
	case h.Type == ChunkOffsetHole && q.Command == CmdRead:
		p, err := c.payload(h)
		if err != nil {
			return err
		}
		start, n, err := ParseOffsetHole(p)
		if err != nil {
			return err
		}
		if err := cl.claim(start, uint64(n)); err != nil {
			return err
		}
		cl.mu.Lock()
		if !cl.abandoned {
			clear(cl.buf[start-q.Offset : start-q.Offset+uint64(n)])
		}
		cl.mu.Unlock()
	case h.Type == ChunkBlockStatus && q.Command == CmdBlockStatus:
		p, err := c.payload(h)
		if err != nil {
			return err
		}
		id, ext, err := ParseBlockStatus(p)
		if err != nil {
			return err
		}
		if id == c.info.metaID {
			if cl.extents != nil {
				return protoErrorf("two block status chunks for one context")
			}
			cl.extents = ext
		}
	case h.Type.IsError():
		p, err := c.payload(h)
		if err != nil {
			return err
		}
		e, err := ParseErrorChunk(h.Type, p)
		if err != nil {
			return err
		}
		if cl.err == nil {
			cl.err = &RequestError{Errno: normErrno(e.Errno), Message: e.Message}
		}
	default:
		return protoErrorf("%v in reply to %v", h.Type, q.Command)
	}
	if !h.Done() {
		return nil
	}
	if cl.err != nil {
		return c.finish(cl, cl.err)
	}
	switch {
	case q.Command == CmdRead && cl.got != uint64(q.Length):
		return protoErrorf("read of %d bytes at %d completed with %d bytes", q.Length, q.Offset, cl.got)
	case q.Command == CmdBlockStatus && cl.extents == nil:
		return protoErrorf("block status completed without extents")
	}
	return c.finish(cl, nil)
}

// finish completes a call whose reply is whole.
func (c *conn) finish(cl *call, err error) error {
	c.mu.Lock()
	delete(c.pending, cl.req.Cookie)
	c.mu.Unlock()
	c.complete(cl, err)
	if errors.Is(err, ESHUTDOWN) {
		c.shutdownSoftly()
	}
	return nil
}

// errServerShutdown ends a connection whose server is going away.
var errServerShutdown = errors.New("server is shutting down (NBD_ESHUTDOWN)")

// shutdownSoftly answers NBD_ESHUTDOWN as the protocol asks, with a soft
// disconnect: no new requests, NBD_CMD_DISC, and the replies still due
// are read until the server closes. Then the client reconnects.
func (c *conn) shutdownSoftly() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return
	}
	c.err = errServerShutdown
	go func() {
		select {
		case c.wsem <- struct{}{}:
		case <-c.done:
			return
		}
		c.raw.SetWriteDeadline(time.Now().Add(time.Second))
		if c.fw.write(AppendRequest(nil, Request{Command: CmdDisc}), nil) == nil {
			c.fw.flush()
		}
		<-c.wsem
	}()
}

// payload reads a bounded chunk payload into memory.
func (c *conn) payload(h ReplyHeader) ([]byte, error) {
	if h.Length > maxChunkPayload {
		return nil, protoErrorf("%v payload of %d bytes", h.Type, h.Length)
	}
	p := make([]byte, h.Length)
	if err := readFull(c.br, p); err != nil {
		return nil, unexpected(err)
	}
	return p, nil
}

// claim records the content chunk [start, start+n) of a read, which must
// lie in the request and overlap no earlier chunk.
func (cl *call) claim(start, n uint64) error {
	q := cl.req
	end := start + n
	if n == 0 || start < q.Offset || end < start || end > q.Offset+uint64(q.Length) {
		return protoErrorf("chunk [%d, %d) outside the read of %d bytes at %d", start, end, q.Length, q.Offset)
	}
	// Servers send chunks in order almost always: append fast, insert
	// otherwise.
	i := len(cl.spans)
	for i > 0 && cl.spans[i-1].start >= end {
		i--
	}
	if i > 0 && cl.spans[i-1].end > start {
		return protoErrorf("chunk [%d, %d) overlaps an earlier one", start, end)
	}
	cl.spans = append(cl.spans, span{})
	copy(cl.spans[i+1:], cl.spans[i:])
	cl.spans[i] = span{start, end}
	cl.got += n
	return nil
}

// readData reads n bytes of read data for the call, at offset rel in its
// buffer, or into nothing if the caller gave up on it.
func (c *conn) readData(cl *call, rel, n uint64) error {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	if cl.abandoned {
		_, err := io.CopyN(io.Discard, c.br, int64(n))
		return unexpected(err)
	}
	return unexpected(readFull(c.br, cl.buf[rel:rel+n]))
}

// normErrno maps values outside the protocol's list to EINVAL, as the
// protocol asks of clients.
func normErrno(e Errno) Errno {
	if e.known() {
		return e
	}
	return EINVAL
}
