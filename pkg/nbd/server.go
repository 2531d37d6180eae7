package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Backend is what a server exports: the engine's child interface
// (quorum.Child has exactly this method set), so *replica.File exports
// as it is. Discard must leave the range reading as zeroes.
type Backend interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64) error
	Flush(ctx context.Context) error
	Discard(ctx context.Context, off, length int64) error
	WriteZeroes(ctx context.Context, off, length int64) error
	Size() int64
}

// BlockSizer is implemented by backends that take only requests aligned
// to a block size (replica.File with direct I/O). The server advertises
// it as the minimum block size and refuses unaligned requests itself,
// with EINVAL, so the backend never sees one.
type BlockSizer interface {
	BlockSize() int64
}

// ExtentLister is implemented by backends that know which ranges are
// allocated. Extents describes consecutive extents from off, covering at
// least one byte and at most length bytes, with StateHole and StateZero
// flags. Without it the server reports every range as allocated data,
// which the protocol allows ("a server MAY always safely report a status
// of 0").
type ExtentLister interface {
	Extents(ctx context.Context, off, length int64) ([]Extent, error)
}

// Export is one named export of a server.
type Export struct {
	Name        string
	Description string
	Backend     Backend
	ReadOnly    bool
	// Epochs, when set, fences the export: writers must present an epoch
	// (see the package documentation) and the store keeps the highest
	// one accepted.
	Epochs EpochStore
	// AllowPlainRead lets clients that present no epoch read a fenced
	// export (read-only), so that qemu-io, qemu-img or nbdinfo can
	// inspect it. Without it they are refused.
	AllowPlainRead bool
}

// ServerConfig configures a Server.
type ServerConfig struct {
	Exports []Export
	// TLS, when set, makes TLS mandatory: before NBD_OPT_STARTTLS the
	// server answers every option but STARTTLS and ABORT with
	// NBD_REP_ERR_TLS_REQD. Set ClientAuth (see ServerTLSConfig) to
	// require client certificates.
	TLS *tls.Config
	// Logger receives connection errors and fencing events; default
	// slog.Default().
	Logger *slog.Logger
	// MaxInFlight bounds the requests one connection may have in flight
	// (default 128), MaxInFlightBytes their payload (default 128 MiB).
	// Past them the server stops reading the connection, which pushes
	// back on the client through TCP.
	MaxInFlight      int
	MaxInFlightBytes int64
	// HandshakeTimeout bounds the whole option negotiation (default 30s).
	HandshakeTimeout time.Duration
}

// Server exports backends over NBD (fixed newstyle). Each connection
// negotiates in one goroutine, then reads requests in one goroutine and
// serves each in its own, so that one connection keeps many requests in
// flight; replies go out in completion order under a write lock.
type Server struct {
	cfg ServerConfig
	log *slog.Logger

	baseCtx context.Context
	cancel  context.CancelFunc

	mu        sync.Mutex
	exports   map[string]*export
	listeners map[net.Listener]struct{}
	conns     map[*serverConn]struct{}
	closing   bool
	connWG    sync.WaitGroup
}

// Limits of the handshake, against clients that would hold a connection
// or memory without ever going to transmission.
const (
	maxOptionData = 64 << 10
	maxOptions    = 256
)

// NewServer checks the exports and loads their epochs.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 128
	}
	if cfg.MaxInFlightBytes <= 0 {
		cfg.MaxInFlightBytes = 128 << 20
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 30 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		cfg: cfg, log: cfg.Logger, baseCtx: ctx, cancel: cancel,
		exports:   map[string]*export{},
		listeners: map[net.Listener]struct{}{},
		conns:     map[*serverConn]struct{}{},
	}
	for _, e := range cfg.Exports {
		if err := s.AddExport(e); err != nil {
			cancel()
			return nil, err
		}
	}
	return s, nil
}

// export is an Export with the state the server keeps for it.
type export struct {
	Export
	size     int64
	minBlock uint32

	// fence orders writes against epoch changes: every write-class
	// request of a fenced export runs under a read lock, and a new
	// epoch is activated under the write lock, so each write of an
	// older holder either completed before the new epoch took effect or
	// is refused.
	fence sync.RWMutex
	epoch atomic.Uint64

	mu    sync.Mutex // guards conns
	conns map[*serverConn]struct{}
}

// AddExport adds an export; names are unique.
func (s *Server) AddExport(e Export) error {
	if e.Backend == nil {
		return fmt.Errorf("nbd export %q: no backend", e.Name)
	}
	if err := checkString(e.Name, "export name"); err != nil || len(e.Name) > MaxString {
		return fmt.Errorf("nbd export %q: not a valid NBD string", e.Name)
	}
	if strings.Contains(e.Name, epochSep) {
		return fmt.Errorf("nbd export %q: %q is reserved in export names", e.Name, epochSep)
	}
	x := &export{Export: e, size: e.Backend.Size(), minBlock: 1, conns: map[*serverConn]struct{}{}}
	if bs, ok := e.Backend.(BlockSizer); ok {
		b := bs.BlockSize()
		if b < 1 || b > 64<<10 || b&(b-1) != 0 {
			return fmt.Errorf("nbd export %q: block size %d is not a power of 2 up to 64 KiB", e.Name, b)
		}
		x.minBlock = uint32(b)
	}
	if x.size < 0 || x.size%int64(x.minBlock) != 0 {
		return fmt.Errorf("nbd export %q: size %d is not a multiple of its block size %d", e.Name, x.size, x.minBlock)
	}
	if e.Epochs != nil {
		ep, err := e.Epochs.LoadEpoch()
		if err != nil {
			return fmt.Errorf("nbd export %q: %w", e.Name, err)
		}
		x.epoch.Store(ep)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.exports[e.Name]; ok {
		return fmt.Errorf("nbd export %q: already exported", e.Name)
	}
	s.exports[e.Name] = x
	return nil
}

// RemoveExport stops exporting name and ends its connections; requests
// in flight on them complete first.
func (s *Server) RemoveExport(name string) error {
	s.mu.Lock()
	x, ok := s.exports[name]
	delete(s.exports, name)
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("nbd export %q: not exported", name)
	}
	x.mu.Lock()
	conns := make([]*serverConn, 0, len(x.conns))
	for c := range x.conns {
		conns = append(conns, c)
	}
	x.mu.Unlock()
	for _, c := range conns {
		c.stop()
	}
	return nil
}

// Epoch returns the current epoch of a fenced export (0 if none yet).
func (s *Server) Epoch(name string) (uint64, bool) {
	s.mu.Lock()
	x, ok := s.exports[name]
	s.mu.Unlock()
	if !ok {
		return 0, false
	}
	return x.epoch.Load(), true
}

func (s *Server) lookup(name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.exports[name]
}

// Serve accepts connections on l until Shutdown or Close, and returns
// ErrServerClosed then.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	var delay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return ErrServerClosed
			}
			if transientAccept(err) {
				// Out of file descriptors and the like: back off as
				// net/http does rather than spin or give up.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("nbd: accept failed; retrying", "error", err, "delay", delay)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("nbd: accept on %s: %w", l.Addr(), err)
		}
		delay = 0
		go s.ServeConn(s.baseCtx, nc) //nolint:errcheck // logged inside
	}
}

// transientAccept reports whether an accept error may clear by itself.
func transientAccept(err error) bool {
	var ne net.Error
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// ServeConn serves one connection until the client disconnects, the
// connection fails or the server shuts down, and closes it. Errors are
// logged too; a misbehaving client only ever ends its own connection.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	c := &serverConn{srv: s, raw: nc, nc: nc, log: s.log.With("remote", nc.RemoteAddr().String())}
	c.br = bufio.NewReaderSize(nc, 64<<10)
	c.bw = bufio.NewWriterSize(nc, 64<<10)
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		nc.Close()
		return ErrServerClosed
	}
	s.conns[c] = struct{}{}
	s.connWG.Add(1)
	s.mu.Unlock()
	defer func() {
		c.detach()
		c.nc.Close()
		c.raw.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		s.connWG.Done()
	}()

	err := c.handshake(ctx)
	if err == nil && c.exp != nil {
		err = c.transmit(ctx)
	}
	switch {
	case err == nil, errors.Is(err, errAborted):
		return nil
	case c.stopping.Load() || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed):
		c.log.Debug("nbd: connection ended", "error", err)
		return nil
	}
	c.log.Warn("nbd: closing connection", "export", c.exportName(), "error", err)
	return err
}

// Shutdown stops accepting connections and options, stops reading new
// requests, lets every request in flight finish and its reply go out,
// then closes the connections. If ctx ends first, it closes everything
// at once (as Close) and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	conns := s.beginClose()
	for _, c := range conns {
		c.stop()
	}
	done := make(chan struct{})
	go func() {
		s.connWG.Wait()
		close(done)
	}()
	select {
	case <-done:
		s.cancel()
		return nil
	case <-ctx.Done():
		s.Close()
		return ctx.Err()
	}
}

// Close closes every listener and connection at once; requests in flight
// see their context cancelled and their replies are lost. It returns
// when every connection's goroutines are done.
func (s *Server) Close() error {
	conns := s.beginClose()
	s.cancel()
	for _, c := range conns {
		c.stopping.Store(true)
		c.raw.Close()
	}
	s.connWG.Wait()
	return nil
}

func (s *Server) beginClose() []*serverConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closing = true
	for l := range s.listeners {
		l.Close()
	}
	conns := make([]*serverConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	return conns
}

// serverConn is one client connection.
type serverConn struct {
	srv *Server
	log *slog.Logger
	raw net.Conn // the TCP or Unix connection, under TLS if any
	nc  net.Conn // what we read and write: raw, or the TLS connection over it
	br  *bufio.Reader
	bw  *bufio.Writer // handshake replies
	fw  *frameWriter  // transmission replies, under wmu

	// Negotiated in the handshake.
	tls        bool
	structured bool
	noZeroes   bool
	metaExport string // export named by the last NBD_OPT_SET_META_CONTEXT
	metaAlloc  bool   // base:allocation selected there
	exp        *export
	epoch      uint64
	readOnly   bool
	flags      TransmissionFlags

	mu           sync.Mutex // guards transmitting against stop
	transmitting bool
	stopping     atomic.Bool // shutdown: read no more requests
	fenced       atomic.Bool // a newer epoch took over; refuse everything

	wmu     sync.Mutex // serialises replies
	writers atomic.Int32
	werr    error // first reply write error, under wmu

	handlers sync.WaitGroup
}

func (c *serverConn) exportName() string {
	if c.exp == nil {
		return ""
	}
	return c.exp.Name
}

// stop makes the connection end after the requests it has read: during
// the handshake at once, in transmission by making the pending read
// return (its deadline passes) so the reader stops and waits for the
// handlers.
func (c *serverConn) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping.Store(true)
	if c.transmitting {
		c.raw.SetReadDeadline(time.Now())
	} else {
		c.raw.Close()
	}
}

// detach removes the connection from its export's list.
func (c *serverConn) detach() {
	if c.exp == nil {
		return
	}
	c.exp.mu.Lock()
	delete(c.exp.conns, c)
	c.exp.mu.Unlock()
}
