package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
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

var stateNames = [...]string{
	Connected:    "connected",
	Disconnected: "disconnected",
	Fenced:       "fenced",
	Closed:       "closed",
}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
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
