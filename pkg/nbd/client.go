package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Config configures a Client.
type Config struct {
	// Network is "tcp" (default) or "unix"; Addr is host:port or a
	// socket path.
	Network string
	Addr    string
	// Export is the export's name; Epoch, if not 0, is presented with it
	// to a fenced export (see the package documentation).
	Export string
	Epoch  uint64
	// TLS, when set, makes the client negotiate TLS first and refuse a
	// server that will not. ServerName defaults to Addr's host.
	TLS *tls.Config
	// Timeout bounds each request whose context has no deadline (default
	// 30s), the time it waits for a reconnect included. A request that
	// times out fails alone; the connection stays. A request that cannot
	// even be handed to the kernel within Timeout means the connection is
	// stuck, and ends it.
	Timeout time.Duration
	// DialTimeout bounds connecting and the handshake (default 10s).
	DialTimeout time.Duration
	// After a connection loss the client reconnects in the background,
	// waiting MinBackoff (default 100ms) before the first attempt and
	// doubling up to MaxBackoff (default 2s), with jitter. The cap is
	// small because requests wait for the reconnect: a server restarted
	// within the requests' timeout must be found again well inside it.
	MinBackoff, MaxBackoff time.Duration
	// Logger receives connection losses and reconnects; default
	// slog.Default().
	Logger *slog.Logger
	// OnStateChange, if set, is called on every change of State, from
	// the client's own goroutines, with the error that caused it.
	OnStateChange func(State, error)
	// Dial replaces net.Dialer, for tests and custom transports.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// State is a client's connection state.
type State int32

const (
	Connected State = iota
	// Disconnected: the connection was lost; the client reconnects, and
	// requests wait for it (each until its deadline) to be sent on the
	// new connection.
	Disconnected
	// Fenced: a newer epoch took the export; requests fail with
	// ErrFenced, for good.
	Fenced
	// Closed: Close was called.
	Closed
)

func (s State) String() string {
	switch s {
	case Connected:
		return "connected"
	case Disconnected:
		return "disconnected"
	case Fenced:
		return "fenced"
	case Closed:
		return "closed"
	}
	return fmt.Sprintf("State(%d)", int32(s))
}

// ExportInfo is what the handshake told about the export.
type ExportInfo struct {
	Size       int64
	Flags      TransmissionFlags
	MinBlock   uint32 // 1 if the server sets no constraint
	PrefBlock  uint32
	MaxBlock   uint32 // largest read or write the client sends
	Structured bool   // structured replies negotiated
	// BlockStatus: base:allocation was negotiated, so BlockStatus works.
	BlockStatus bool
	metaID      uint32
}

// Client is an NBD client for one export. It implements quorum.Child:
// many requests are in flight at once on one connection (a write lock
// orders requests on the wire, one reader goroutine routes replies by
// cookie), each with its own timeout. A lost connection is not a failure
// of the requests it carried: the client reconnects in the background,
// and every request in flight, and every new one, waits for the new
// connection and is sent again on it, each until its own deadline.
// Only a request whose deadline passes first fails (with ErrDisconnected
// and context.DeadlineExceeded), so the engine marks the child faulty
// only when its server stays away longer than the timeout, not when it
// restarts. Resending is safe because every request the engine sends is
// idempotent (a read, a write of given bytes, a flush, write-zeroes) and
// the engine never has two overlapping requests of which one modifies
// data in flight on one child (see the package documentation).
type Client struct {
	cfg  Config
	log  *slog.Logger
	info ExportInfo // from the first connection; later ones must match

	base   context.Context // cancelled by Close, ends reconnect attempts
	cancel context.CancelFunc

	mu      sync.Mutex
	cur     *conn // nil unless Connected
	state   State
	lastErr error
	// refused is set while the export the client last reached is not the
	// one it had (compatible): requests fail at once with it rather than
	// wait, since waiting cannot make the export right.
	refused error
	// changed is closed, and replaced, at every change a waiting request
	// must see: a new connection, the loss of one, a final state, refused.
	changed chan struct{}
	wg      sync.WaitGroup // reconnect goroutine
}

// Dial connects to an export and negotiates. The first connection must
// succeed; later losses are handled in the background.
func Dial(ctx context.Context, cfg Config) (*Client, error) {
	if cfg.Network == "" {
		cfg.Network = "tcp"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 10 * time.Second
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(2*time.Second, cfg.MinBackoff)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	cl := &Client{cfg: cfg, log: cfg.Logger.With("nbd", cfg.String()), changed: make(chan struct{})}
	cl.base, cl.cancel = context.WithCancel(context.Background())
	c, err := cl.connect(ctx)
	if err != nil {
		cl.cancel()
		return nil, fmt.Errorf("nbd %s: %w", cfg, err)
	}
	cl.info = c.info
	cl.cur = c
	c.start()
	return cl, nil
}

// String names the export as an NBD URI, for errors and logs.
func (cfg Config) String() string {
	scheme := "nbd"
	if cfg.TLS != nil {
		scheme = "nbds"
	}
	if cfg.Network == "unix" {
		return fmt.Sprintf("%s+unix:///%s?socket=%s", scheme, ExportName(cfg.Export, cfg.Epoch), cfg.Addr)
	}
	return fmt.Sprintf("%s://%s/%s", scheme, cfg.Addr, ExportName(cfg.Export, cfg.Epoch))
}

// Info returns what the handshake told about the export.
func (cl *Client) Info() ExportInfo { return cl.info }

// Size implements quorum.Child.
func (cl *Client) Size() int64 { return cl.info.Size }

// BlockSize is the alignment the server requires of offsets and lengths.
func (cl *Client) BlockSize() int64 { return int64(cl.info.MinBlock) }

// State returns the connection state and the error behind it.
func (cl *Client) State() (State, error) {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.state, cl.lastErr
}

func (cl *Client) setState(s State, err error) {
	if cb := cl.cfg.OnStateChange; cb != nil {
		cb(s, err)
	}
}

// notifyLocked wakes every request waiting in await; cl.mu is held.
func (cl *Client) notifyLocked() {
	close(cl.changed)
	cl.changed = make(chan struct{})
}

// await returns the live connection other than lost (the one a request
// just lost, which the client may not have noticed yet), waiting while
// the client reconnects until ctx ends or deadline passes. It fails at
// once when the client is fenced or closed, or reached an export that
// changed.
func (cl *Client) await(ctx context.Context, deadline time.Time, lost *conn) (*conn, error) {
	var timer *time.Timer
	for {
		cl.mu.Lock()
		state, cur, lastErr, refused, changed := cl.state, cl.cur, cl.lastErr, cl.refused, cl.changed
		cl.mu.Unlock()
		switch {
		case state == Connected && cur != lost:
			return cur, nil
		case state == Fenced:
			return nil, lastErr
		case state == Closed:
			return nil, ErrClosed
		case state == Disconnected && refused != nil:
			return nil, fmt.Errorf("%w (reconnecting): %w", ErrDisconnected, refused)
		}
		if timer == nil {
			timer = time.NewTimer(time.Until(deadline))
			defer timer.Stop()
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (reconnecting, last error: %v): %w", ErrDisconnected, lastErr, ctx.Err())
		case <-timer.C:
			return nil, fmt.Errorf("%w: not reconnected within the request's timeout (last error: %v): %w", ErrDisconnected, lastErr, context.DeadlineExceeded)
		}
	}
}

// lost is called once per connection, by its reader, when it ends.
func (cl *Client) lost(c *conn, err error) {
	cl.mu.Lock()
	if cl.cur != c {
		cl.mu.Unlock()
		return
	}
	cl.cur = nil
	if cl.state != Connected {
		cl.mu.Unlock()
		return
	}
	state := Disconnected
	if errors.Is(err, ErrFenced) {
		state = Fenced
	}
	cl.state, cl.lastErr = state, err
	cl.notifyLocked()
	if state == Disconnected {
		cl.wg.Add(1)
		go cl.reconnect()
	}
	cl.mu.Unlock()
	if state == Fenced {
		cl.log.Error("nbd: fenced by a newer epoch; not reconnecting", "error", err)
	} else {
		cl.log.Warn("nbd: connection lost; reconnecting, requests wait for it", "error", err)
	}
	cl.setState(state, err)
}

// fence makes the client Fenced after a request was refused as fenced,
// also when the server already closed that connection: the requests
// waiting for a reconnect fail at once.
func (cl *Client) fence(err error) {
	cl.mu.Lock()
	c := cl.cur
	if cl.state != Connected && cl.state != Disconnected {
		cl.mu.Unlock()
		return
	}
	cl.cur, cl.state, cl.lastErr = nil, Fenced, err
	cl.notifyLocked()
	cl.mu.Unlock()
	cl.log.Error("nbd: fenced by a newer epoch; not reconnecting", "error", err)
	if c != nil {
		c.kill(err)
	}
	cl.setState(Fenced, err)
}

func (cl *Client) reconnect() {
	defer cl.wg.Done()
	delay := cl.cfg.MinBackoff
	for attempt := 1; ; attempt++ {
		// Full jitter in [delay/2, delay), so that the clients of a
		// restarted server do not come back in lockstep.
		wait := delay/2 + rand.N(delay/2+1)
		select {
		case <-time.After(wait):
		case <-cl.base.Done():
			return
		}
		ctx, cancel := context.WithTimeout(cl.base, cl.cfg.DialTimeout)
		c, err := cl.connect(ctx)
		cancel()
		if err == nil {
			err = cl.compatible(c.info)
			if err != nil {
				c.raw.Close()
			}
		}
		cl.mu.Lock()
		if cl.state != Disconnected {
			cl.mu.Unlock()
			if c != nil && err == nil {
				c.raw.Close()
			}
			return
		}
		switch {
		case err == nil:
			cl.cur, cl.state, cl.lastErr, cl.refused = c, Connected, nil, nil
			c.start()
			cl.notifyLocked()
		case errors.Is(err, ErrFenced):
			cl.state, cl.lastErr = Fenced, err
			cl.notifyLocked()
		case errors.Is(err, ErrExportChanged):
			cl.lastErr, cl.refused = err, err
			cl.notifyLocked()
		default:
			cl.lastErr = err
		}
		state := cl.state
		cl.mu.Unlock()
		switch {
		case err == nil:
			cl.log.Info("nbd: reconnected", "attempt", attempt)
			cl.setState(Connected, nil)
			return
		case state == Fenced:
			cl.log.Error("nbd: fenced by a newer epoch; not reconnecting", "error", err)
			cl.setState(Fenced, err)
			return
		}
		cl.log.Debug("nbd: reconnect failed", "attempt", attempt, "error", err)
		delay = min(2*delay, cl.cfg.MaxBackoff)
	}
}

// compatible refuses a reconnection to an export that changed under us:
// the engine sized the volume by the first one.
func (cl *Client) compatible(n ExportInfo) error {
	o := cl.info
	if n.Size != o.Size || n.MinBlock > o.MinBlock || n.MaxBlock < o.MinBlock || n.Flags&FlagReadOnly != o.Flags&FlagReadOnly {
		return fmt.Errorf("%w: size %d -> %d, block size %d -> %d, flags %v -> %v",
			ErrExportChanged, o.Size, n.Size, o.MinBlock, n.MinBlock, o.Flags, n.Flags)
	}
	return nil
}

// Close waits (up to Timeout) for requests in flight, disconnects
// cleanly and stops reconnecting. Requests waiting for a reconnect, and
// later ones, fail with ErrClosed.
func (cl *Client) Close() error {
	cl.mu.Lock()
	if cl.state == Closed {
		cl.mu.Unlock()
		return nil
	}
	c := cl.cur
	cl.cur, cl.state = nil, Closed
	cl.notifyLocked()
	cl.mu.Unlock()
	cl.cancel()
	if c != nil {
		c.disconnect(cl.cfg.Timeout)
	}
	cl.wg.Wait()
	cl.setState(Closed, nil)
	return nil
}

// ReadAt implements quorum.Child.
func (cl *Client) ReadAt(ctx context.Context, p []byte, off int64) error {
	return cl.transfer(ctx, CmdRead, p, off)
}

// WriteAt implements quorum.Child.
func (cl *Client) WriteAt(ctx context.Context, p []byte, off int64) error {
	return cl.transfer(ctx, CmdWrite, p, off)
}

// Flush implements quorum.Child.
func (cl *Client) Flush(ctx context.Context) error {
	if cl.info.Flags&FlagSendFlush == 0 {
		// The server has no cache to flush: every write it acknowledged
		// is on stable storage.
		return nil
	}
	return cl.wrap("flush", 0, 0, cl.single(ctx, Request{Command: CmdFlush}, nil, nil))
}

// Discard implements quorum.Child: NBD_CMD_WRITE_ZEROES without NO_HOLE,
// so the server may punch holes but the range reads as zeroes. (TRIM
// would let the range read as anything, and replicas must stay equal.)
func (cl *Client) Discard(ctx context.Context, off, length int64) error {
	return cl.zero(ctx, "discard", 0, off, length)
}

// WriteZeroes implements quorum.Child: NBD_CMD_WRITE_ZEROES with
// NO_HOLE, so the range stays allocated.
func (cl *Client) WriteZeroes(ctx context.Context, off, length int64) error {
	return cl.zero(ctx, "write zeroes", CmdFlagNoHole, off, length)
}

// BlockStatus reports the base:allocation extents from off, covering at
// least one byte and at most length bytes (length may be cut to 4 GiB
// minus a block).
func (cl *Client) BlockStatus(ctx context.Context, off, length int64) ([]Extent, error) {
	if !cl.info.BlockStatus {
		return nil, cl.wrap("block status", off, length, errors.New("server offers no base:allocation context"))
	}
	length = min(length, int64(^uint32(0)/cl.info.MinBlock*cl.info.MinBlock))
	if err := cl.checkRange(off, length); err != nil {
		return nil, cl.wrap("block status", off, length, err)
	}
	var ext []Extent
	err := cl.single(ctx, Request{Command: CmdBlockStatus, Offset: uint64(off), Length: uint32(length)}, nil, &ext)
	return ext, cl.wrap("block status", off, length, err)
}

func (cl *Client) wrap(op string, off, length int64, err error) error {
	if err == nil {
		return nil
	}
	if op == "flush" {
		return fmt.Errorf("nbd %s: flush: %w", cl.cfg, err)
	}
	return fmt.Errorf("nbd %s: %s at %d length %d: %w", cl.cfg, op, off, length, err)
}

func (cl *Client) checkRange(off, length int64) error {
	if off < 0 || length < 0 || off > cl.info.Size || length > cl.info.Size-off {
		return fmt.Errorf("beyond the export's %d bytes", cl.info.Size)
	}
	if m := int64(cl.info.MinBlock); off%m != 0 || length%m != 0 {
		return fmt.Errorf("not aligned to the server's block size %d", m)
	}
	return nil
}

func (cl *Client) writable() error {
	if cl.info.Flags&FlagReadOnly != 0 {
		return &RequestError{Errno: EPERM, Message: "export is read-only"}
	}
	return nil
}

// transfer runs a read or write, split at MaxBlock, all pieces in
// flight at once.
func (cl *Client) transfer(ctx context.Context, cmd Command, p []byte, off int64) error {
	op := "read"
	if cmd == CmdWrite {
		op = "write"
	}
	n := int64(len(p))
	if err := cl.checkRange(off, n); err != nil {
		return cl.wrap(op, off, n, err)
	}
	if cmd == CmdWrite {
		if err := cl.writable(); err != nil {
			return cl.wrap(op, off, n, err)
		}
	}
	if n == 0 {
		return nil
	}
	step := int64(cl.info.MaxBlock)
	if n <= step {
		req := Request{Command: cmd, Offset: uint64(off), Length: uint32(n)}
		if cmd == CmdWrite {
			return cl.wrap(op, off, n, cl.single(ctx, req, p, nil))
		}
		return cl.wrap(op, off, n, cl.singleRead(ctx, req, p))
	}
	var reqs []Request
	var bufs [][]byte
	for i := int64(0); i < n; i += step {
		m := min(step, n-i)
		reqs = append(reqs, Request{Command: cmd, Offset: uint64(off + i), Length: uint32(m)})
		bufs = append(bufs, p[i:i+m])
	}
	return cl.wrap(op, off, n, cl.batch(ctx, reqs, bufs))
}

// zero runs WRITE_ZEROES over a range, split at MaxBlock (the protocol
// bounds WRITE_ZEROES by the maximum block size too), or writes zeroes
// when the server lacks the command.
func (cl *Client) zero(ctx context.Context, op string, flags CmdFlags, off, length int64) error {
	if err := cl.checkRange(off, length); err != nil {
		return cl.wrap(op, off, length, err)
	}
	if err := cl.writable(); err != nil {
		return cl.wrap(op, off, length, err)
	}
	if length == 0 {
		return nil
	}
	step := int64(cl.info.MaxBlock)
	if cl.info.Flags&FlagSendWriteZeroes == 0 {
		step = min(step, 1<<20)
		z := make([]byte, min(step, length))
		for i := int64(0); i < length; i += step {
			m := min(step, length-i)
			if err := cl.transfer(ctx, CmdWrite, z[:m], off+i); err != nil {
				return err
			}
		}
		return nil
	}
	var reqs []Request
	for i := int64(0); i < length; i += step {
		m := min(step, length-i)
		reqs = append(reqs, Request{Command: CmdWriteZeroes, Flags: flags, Offset: uint64(off + i), Length: uint32(m)})
	}
	return cl.wrap(op, off, length, cl.batch(ctx, reqs, make([][]byte, len(reqs))))
}

// deadline is when a request started now must have its reply: the
// caller's, or Timeout from now.
func (cl *Client) deadline(ctx context.Context) time.Time {
	if d, ok := ctx.Deadline(); ok {
		return d
	}
	return time.Now().Add(cl.cfg.Timeout)
}

// do runs a request: attempt on the live connection, and again on the
// next one whenever the connection is lost before the reply (resendable),
// until the request's deadline. The deadline is fixed at the start, so
// the waits for reconnects count against it.
func (cl *Client) do(ctx context.Context, attempt func(c *conn, deadline time.Time) error) error {
	dl := cl.deadline(ctx)
	var lost *conn
	for {
		c, err := cl.await(ctx, dl, lost)
		if err != nil {
			return err
		}
		err = attempt(c, dl)
		if !resendable(err) {
			return cl.check(err)
		}
		if !time.Now().Before(dl) {
			// await checks the deadline only when it waits; a server that
			// takes connections and drops them at once must not keep a
			// request going.
			return fmt.Errorf("%w (not sent again: the request's timeout passed): %w", err, context.DeadlineExceeded)
		}
		lost = c
	}
}

// resendable reports whether a request failed only because its
// connection went away, or because the server answered that it is
// shutting down (NBD_ESHUTDOWN, which it sends instead of serving the
// request), so that it may be sent again on the next connection. A
// connection the server broke with bytes that are no NBD (a protocol
// violation) fails its requests for good, and so does fencing.
func resendable(err error) bool {
	var pe *ProtocolError
	if err == nil || errors.Is(err, ErrFenced) || errors.As(err, &pe) {
		return false
	}
	return errors.Is(err, ErrDisconnected) || errors.Is(err, ESHUTDOWN)
}

func (cl *Client) single(ctx context.Context, req Request, payload []byte, ext *[]Extent) error {
	return cl.do(ctx, func(c *conn, dl time.Time) error {
		call, err := c.submit(ctx, req, payload, nil)
		if err != nil {
			return err
		}
		if err := c.wait(ctx, call, dl); err != nil {
			return err
		}
		if ext != nil {
			*ext = call.extents
		}
		return nil
	})
}

func (cl *Client) singleRead(ctx context.Context, req Request, p []byte) error {
	return cl.do(ctx, func(c *conn, dl time.Time) error {
		call, err := c.submit(ctx, req, nil, p)
		if err != nil {
			return err
		}
		return c.wait(ctx, call, dl)
	})
}

// batch submits every request, then waits for all; on the first error
// it abandons the rest, so that none writes into bufs after the attempt
// (a later attempt, or the caller, owns them then).
func (cl *Client) batch(ctx context.Context, reqs []Request, bufs [][]byte) error {
	return cl.do(ctx, func(c *conn, dl time.Time) error {
		calls := make([]*call, 0, len(reqs))
		defer func() {
			for _, call := range calls {
				call.abandon()
			}
		}()
		for i, req := range reqs {
			var payload, dst []byte
			if req.Command == CmdWrite {
				payload = bufs[i]
			} else {
				dst = bufs[i]
			}
			call, err := c.submit(ctx, req, payload, dst)
			if err != nil {
				return err
			}
			calls = append(calls, call)
		}
		for _, call := range calls {
			if err := c.wait(ctx, call, dl); err != nil {
				return err
			}
		}
		return nil
	})
}

// check turns a fenced refusal into ErrFenced and fences the client.
func (cl *Client) check(err error) error {
	var re *RequestError
	if errors.As(err, &re) && strings.HasPrefix(re.Message, fencedPrefix) {
		err = fmt.Errorf("%w: %w", ErrFenced, err)
		cl.fence(err)
	}
	return err
}

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

// connect dials and negotiates one connection.
func (cl *Client) connect(ctx context.Context) (*conn, error) {
	ctx, cancel := context.WithTimeout(ctx, cl.cfg.DialTimeout)
	defer cancel()
	raw, err := cl.dial(ctx)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { raw.SetDeadline(time.Unix(1, 0)) })
	nc, br, info, err := handshake(ctx, raw, cl.cfg)
	if !stop() || err != nil {
		raw.Close()
		if err == nil {
			err = ctx.Err()
		}
		return nil, err
	}
	raw.SetDeadline(time.Time{})
	return newConn(raw, nc, br, info, cl.cfg.Timeout, cl.lost), nil
}

func (cl *Client) dial(ctx context.Context) (net.Conn, error) {
	if cl.cfg.Dial != nil {
		return cl.cfg.Dial(ctx, cl.cfg.Network, cl.cfg.Addr)
	}
	d := net.Dialer{
		// Find a dead peer while idle, not only when a request times out.
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 10 * time.Second, Interval: 5 * time.Second, Count: 3},
	}
	if cl.cfg.Network == "tcp" || cl.cfg.Network == "tcp4" || cl.cfg.Network == "tcp6" {
		ms := int(cl.cfg.Timeout / time.Millisecond)
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			// Data unacknowledged for Timeout ends the connection: a peer
			// cut off (not closed) would otherwise hold requests for the
			// kernel's retransmission timeout, about 15 minutes.
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, ms)
			})
			if err != nil {
				return err
			}
			return serr
		}
	}
	return d.DialContext(ctx, cl.cfg.Network, cl.cfg.Addr)
}
