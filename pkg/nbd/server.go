package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/bits"
	"net"
	"sort"
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

var errAborted = errors.New("client aborted the handshake")

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

func (c *serverConn) handshake(ctx context.Context) error {
	c.raw.SetDeadline(time.Now().Add(c.srv.cfg.HandshakeTimeout))
	if err := WriteGreeting(c.bw, FlagFixedNewstyle|FlagNoZeroes); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	cf, err := ReadClientFlags(c.br)
	if err != nil {
		return fmt.Errorf("read client flags: %w", err)
	}
	if cf&^(FlagCFixedNewstyle|FlagCNoZeroes) != 0 {
		return protoErrorf("unknown client flags %#x", uint32(cf))
	}
	if c.srv.cfg.TLS != nil && cf&FlagCFixedNewstyle == 0 {
		// TLS needs fixed newstyle; such a client can never get in.
		return protoErrorf("client without fixed newstyle, but TLS is required")
	}
	c.noZeroes = cf&FlagCNoZeroes != 0
	for n := 0; ; n++ {
		if n == maxOptions {
			return protoErrorf("more than %d options", maxOptions)
		}
		o, err := ReadOption(c.br, maxOptionData)
		if err != nil {
			return fmt.Errorf("read option: %w", unexpected(err))
		}
		done, err := c.option(ctx, o)
		if err != nil {
			return fmt.Errorf("%v: %w", o.Option, err)
		}
		if err := c.bw.Flush(); err != nil {
			return err
		}
		if done {
			return nil
		}
	}
}

func (c *serverConn) reply(o Option, t ReplyType, data []byte) error {
	return WriteOptionReply(c.bw, OptionReply{Option: o, Type: t, Data: data})
}

func (c *serverConn) replyErr(o Option, t ReplyType, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if len(msg) > MaxString {
		msg = msg[:MaxString]
	}
	return c.reply(o, t, []byte(msg))
}

// option handles one option; done means transmission begins.
func (c *serverConn) option(ctx context.Context, o OptionRequest) (done bool, err error) {
	if c.stopping.Load() && o.Option != OptAbort {
		return false, c.replyErr(o.Option, RepErrShutdown, "server is shutting down")
	}
	if c.srv.cfg.TLS != nil && !c.tls {
		switch o.Option {
		case OptStartTLS, OptAbort:
		case OptExportName:
			return false, protoErrorf("NBD_OPT_EXPORT_NAME before TLS, which is required")
		default:
			return false, c.replyErr(o.Option, RepErrTLSReqd, "TLS is required: send NBD_OPT_STARTTLS first")
		}
	}
	switch o.Option {
	case OptAbort:
		c.reply(o.Option, RepAck, nil)
		c.bw.Flush()
		return false, errAborted

	case OptList:
		if len(o.Data) != 0 {
			return false, c.replyErr(o.Option, RepErrInvalid, "NBD_OPT_LIST takes no data")
		}
		s := c.srv
		s.mu.Lock()
		names := make([]string, 0, len(s.exports))
		for n := range s.exports {
			names = append(names, n)
		}
		s.mu.Unlock()
		sort.Strings(names)
		for _, n := range names {
			if x := s.lookup(n); x != nil {
				if err := c.reply(o.Option, RepServer, AppendServerReply(nil, n, x.Description)); err != nil {
					return false, err
				}
			}
		}
		return false, c.reply(o.Option, RepAck, nil)

	case OptStartTLS:
		switch {
		case c.srv.cfg.TLS == nil:
			return false, c.replyErr(o.Option, RepErrPolicy, "TLS is not configured on this server")
		case c.tls:
			return false, c.replyErr(o.Option, RepErrInvalid, "TLS is already running")
		case len(o.Data) != 0:
			return false, c.replyErr(o.Option, RepErrInvalid, "NBD_OPT_STARTTLS takes no data")
		}
		if err := c.reply(o.Option, RepAck, nil); err != nil {
			return false, err
		}
		if err := c.bw.Flush(); err != nil {
			return false, err
		}
		if c.br.Buffered() > 0 {
			// Plain bytes after STARTTLS would be read as TLS records by
			// nobody: the client did not wait for our ACK.
			return false, protoErrorf("data after NBD_OPT_STARTTLS before the TLS handshake")
		}
		tc := tls.Server(c.raw, c.srv.cfg.TLS)
		if err := tc.HandshakeContext(ctx); err != nil {
			return false, fmt.Errorf("TLS handshake: %w", err)
		}
		c.nc, c.tls = tc, true
		c.br.Reset(tc)
		c.bw.Reset(tc)
		// The protocol forbids keeping state negotiated in clear text.
		c.structured, c.metaExport, c.metaAlloc = false, "", false
		c.log = c.log.With("tls", true)
		return false, nil

	case OptStructuredReply:
		if len(o.Data) != 0 {
			return false, c.replyErr(o.Option, RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		return false, c.reply(o.Option, RepAck, nil)

	case OptListMetaContext, OptSetMetaContext:
		return false, c.metaContext(o)

	case OptInfo, OptGo:
		q, err := ParseExportRequest(o.Data)
		if err != nil {
			return false, c.replyErr(o.Option, RepErrInvalid, "%v", err)
		}
		return c.infoGo(o.Option, q)

	case OptExportName:
		// No error can be sent: refusing means closing.
		if err := checkString(string(o.Data), "export name"); err != nil {
			return false, err
		}
		x, epoch, ro, _, msg := c.resolve(string(o.Data))
		if x == nil {
			return false, fmt.Errorf("export %q refused: %s", o.Data, msg)
		}
		if !c.attach(x, epoch, ro) {
			return false, fmt.Errorf("export %q refused: %s", o.Data, fencedMessage(epoch, x))
		}
		return true, WriteExportNameReply(c.bw, uint64(x.size), c.flags, !c.noZeroes)

	default:
		return false, c.replyErr(o.Option, RepErrUnsup, "%v is not supported", o.Option)
	}
}

// resolve finds the export a wire name opens and the access it grants.
// On refusal x is nil and rep, msg say why.
func (c *serverConn) resolve(wire string) (x *export, epoch uint64, readOnly bool, rep ReplyType, msg string) {
	name, epoch, err := SplitExportName(wire)
	if err != nil {
		return nil, 0, false, RepErrInvalid, err.Error()
	}
	if x = c.srv.lookup(name); x == nil {
		return nil, 0, false, RepErrUnknown, fmt.Sprintf("no export %q", name)
	}
	readOnly = x.ReadOnly
	switch {
	case x.Epochs == nil && epoch != 0:
		// A client asking for fencing must get it or nothing.
		return nil, 0, false, RepErrPolicy, fmt.Sprintf("export %q is not fenced; it cannot honour an epoch", name)
	case x.Epochs != nil && epoch == 0:
		if !x.AllowPlainRead {
			return nil, 0, false, RepErrPolicy, fmt.Sprintf("export %q is fenced: open it as %q", name, name+epochSep+"N")
		}
		readOnly = true
	case x.Epochs != nil && epoch < x.epoch.Load():
		return nil, 0, false, RepErrPolicy, fencedMessage(epoch, x)
	}
	return x, epoch, readOnly, 0, ""
}

func fencedMessage(epoch uint64, x *export) string {
	return fmt.Sprintf("%s epoch %d of export %q is older than its current epoch %d", fencedPrefix, epoch, x.Name, x.epoch.Load())
}

// attach enters the connection into its export's list, unless a newer
// epoch took over since resolve; the check and the entry are atomic with
// respect to activate, which ends every older connection in the list.
func (c *serverConn) attach(x *export, epoch uint64, readOnly bool) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.Epochs != nil && epoch != 0 && epoch < x.epoch.Load() {
		return false
	}
	c.exp, c.epoch, c.readOnly = x, epoch, readOnly
	c.flags = transmissionFlags(c.structured, readOnly)
	x.conns[c] = struct{}{}
	return true
}

func transmissionFlags(structured, readOnly bool) TransmissionFlags {
	// Every connection shares the backend and Flush reaches the disk, so
	// a flush on one connection covers writes completed on any: that is
	// what CAN_MULTI_CONN promises.
	f := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn
	if structured {
		f |= FlagSendDF // reads are always one chunk
	}
	if readOnly {
		f |= FlagReadOnly
	}
	return f
}

func (c *serverConn) infoGo(opt Option, q ExportRequest) (bool, error) {
	x, epoch, ro, rep, msg := c.resolve(q.Name)
	if x == nil {
		return false, c.replyErr(opt, rep, "%s", msg)
	}
	flags := transmissionFlags(c.structured, ro)
	if opt == OptGo && !c.attach(x, epoch, ro) {
		return false, c.replyErr(opt, RepErrPolicy, "%s", fencedMessage(epoch, x))
	}
	infos := []Info{
		{Type: InfoExport, Size: uint64(x.size), Flags: flags},
		// Sent whether asked or not (the protocol allows it), so that
		// clients learn the alignment a direct-I/O backend needs.
		{Type: InfoBlockSize, MinBlock: x.minBlock, PrefBlock: max(4096, x.minBlock), MaxBlock: MaxPayload},
	}
	for _, t := range q.Infos {
		switch t {
		case InfoName:
			infos = append(infos, Info{Type: InfoName, Text: x.Name})
		case InfoDescription:
			if x.Description != "" {
				infos = append(infos, Info{Type: InfoDescription, Text: x.Description})
			}
		}
	}
	for _, i := range infos {
		if err := c.reply(opt, RepInfo, i.Append(nil)); err != nil {
			return false, err
		}
	}
	if err := c.reply(opt, RepAck, nil); err != nil {
		return false, err
	}
	if opt == OptGo && c.exp.Name != c.metaExport {
		c.metaAlloc = false // contexts were chosen for another export
	}
	return opt == OptGo, nil
}

// metaContextID is the id of base:allocation, the only context we have.
const metaContextID = 1

func (c *serverConn) metaContext(o OptionRequest) error {
	set := o.Option == OptSetMetaContext
	if set {
		c.metaExport, c.metaAlloc = "", false // replaced even on failure
	}
	if !c.structured {
		return c.replyErr(o.Option, RepErrInvalid, "negotiate NBD_OPT_STRUCTURED_REPLY first")
	}
	q, err := ParseMetaContextRequest(o.Data)
	if err != nil {
		return c.replyErr(o.Option, RepErrInvalid, "%v", err)
	}
	name, _, err := SplitExportName(q.Export)
	if err != nil {
		return c.replyErr(o.Option, RepErrInvalid, "%v", err)
	}
	if c.srv.lookup(name) == nil {
		return c.replyErr(o.Option, RepErrUnknown, "no export %q", name)
	}
	match := !set && len(q.Queries) == 0 // listing everything
	for _, s := range q.Queries {
		if s == MetaBaseAllocation || (!set && s == "base:") {
			match = true
		}
	}
	if match {
		id := uint32(0) // reserved in list replies
		if set {
			id = metaContextID
			c.metaExport, c.metaAlloc = name, true
		}
		if err := c.reply(o.Option, RepMetaContext, AppendMetaContextReply(nil, id, MetaBaseAllocation)); err != nil {
			return err
		}
	}
	return c.reply(o.Option, RepAck, nil)
}

// transmit reads requests until the client disconnects or the
// connection ends, serving each in its own goroutine.
func (c *serverConn) transmit(ctx context.Context) error {
	c.raw.SetDeadline(time.Time{})
	c.mu.Lock()
	c.transmitting = true
	stopping := c.stopping.Load()
	c.mu.Unlock()
	if stopping {
		return nil
	}
	c.log = c.log.With("export", c.exp.Name, "epoch", c.epoch)
	c.fw = newFrameWriter(c.nc)
	b := newBudget(c.srv.cfg.MaxInFlight, c.srv.cfg.MaxInFlightBytes)
	defer func() {
		b.close()
		c.handlers.Wait()
		c.wmu.Lock()
		c.fw.flush()
		c.wmu.Unlock()
	}()
	for {
		q, err := ReadRequest(c.br)
		if err != nil {
			var ne net.Error
			if c.stopping.Load() && errors.As(err, &ne) && ne.Timeout() {
				return nil // Shutdown: serve what we have, read no more
			}
			if errors.Is(err, io.EOF) {
				return nil // client left without NBD_CMD_DISC
			}
			return fmt.Errorf("read request: %w", err)
		}
		var payload []byte
		switch q.Command {
		case CmdDisc:
			return nil
		case CmdWrite:
			if q.Length > MaxPayload {
				// Its payload is too large to skip safely: the protocol
				// lets the server drop such a client.
				return protoErrorf("write of %d bytes at %d, limit %d", q.Length, q.Offset, MaxPayload)
			}
			if errno, msg := c.check(q); errno != 0 {
				// Refused anyway: skip the payload instead of buffering it.
				if _, err := io.CopyN(io.Discard, c.br, int64(q.Length)); err != nil {
					return fmt.Errorf("read write payload: %w", unexpected(err))
				}
				c.sendError(q, errno, msg)
				continue
			}
			payload = getBuf(int(q.Length))
			if _, err := io.ReadFull(c.br, payload); err != nil {
				putBuf(payload)
				return fmt.Errorf("read write payload: %w", unexpected(err))
			}
		}
		weight := int64(0)
		if q.Command == CmdRead || q.Command == CmdWrite {
			weight = int64(min(q.Length, MaxPayload))
		}
		if !b.acquire(weight) {
			putBuf(payload)
			return nil
		}
		c.handlers.Add(1)
		go func() {
			defer c.handlers.Done()
			defer b.release(weight)
			c.serve(ctx, q, payload)
			putBuf(payload)
		}()
	}
}

// writeClass reports whether cmd changes data or durability; these are
// what fencing and read-only exports refuse.
func writeClass(cmd Command) bool {
	switch cmd {
	case CmdWrite, CmdWriteZeroes, CmdTrim, CmdFlush:
		return true
	}
	return false
}

// check validates a request against the protocol and the export. It
// returns 0 for a request to execute.
func (c *serverConn) check(q Request) (Errno, string) {
	allowed := CmdFlagFUA
	switch q.Command {
	case CmdRead:
		if c.structured {
			allowed |= CmdFlagDF
		}
	case CmdWriteZeroes:
		allowed |= CmdFlagNoHole
	case CmdBlockStatus:
		allowed |= CmdFlagReqOne
	case CmdWrite, CmdFlush, CmdTrim, CmdCache:
	default:
		return EINVAL, fmt.Sprintf("unknown command %v", q.Command)
	}
	if bad := q.Flags &^ allowed; bad != 0 {
		return EINVAL, fmt.Sprintf("flags %v not valid for %v", bad, q.Command)
	}
	if c.fenced.Load() || (c.exp.Epochs != nil && c.epoch != 0 && c.epoch < c.exp.epoch.Load()) {
		return EPERM, fencedMessage(c.epoch, c.exp)
	}
	if writeClass(q.Command) && c.readOnly && q.Command != CmdFlush {
		return EPERM, fmt.Sprintf("export %q is read-only on this connection", c.exp.Name)
	}
	if q.Command == CmdFlush {
		return 0, ""
	}
	end, carry := bits.Add64(q.Offset, uint64(q.Length), 0)
	if carry != 0 || end > uint64(c.exp.size) {
		if q.Command == CmdWrite || q.Command == CmdWriteZeroes {
			return ENOSPC, fmt.Sprintf("%v at %d length %d beyond the export's %d bytes", q.Command, q.Offset, q.Length, c.exp.size)
		}
		return EINVAL, fmt.Sprintf("%v at %d length %d beyond the export's %d bytes", q.Command, q.Offset, q.Length, c.exp.size)
	}
	if m := uint64(c.exp.minBlock); q.Offset%m != 0 || uint64(q.Length)%m != 0 {
		return EINVAL, fmt.Sprintf("%v at %d length %d not aligned to the block size %d", q.Command, q.Offset, q.Length, m)
	}
	switch q.Command {
	case CmdRead:
		if q.Length > MaxPayload {
			return EINVAL, fmt.Sprintf("read of %d bytes, limit %d", q.Length, MaxPayload)
		}
	case CmdBlockStatus:
		if !c.metaAlloc {
			return EINVAL, "no metadata context was negotiated"
		}
		if q.Length == 0 {
			return EINVAL, "block status of length 0"
		}
	}
	return 0, ""
}

// serve executes one request and sends its reply.
func (c *serverConn) serve(ctx context.Context, q Request, payload []byte) {
	if errno, msg := c.check(q); errno != 0 {
		c.sendError(q, errno, msg)
		return
	}
	bk := c.exp.Backend
	off, n := int64(q.Offset), int64(q.Length)
	var err error
	switch q.Command {
	case CmdRead:
		buf := getBuf(int(n))
		defer putBuf(buf)
		if n > 0 {
			err = bk.ReadAt(ctx, buf, off)
		}
		if err == nil {
			c.sendData(q, buf)
			return
		}
	case CmdCache:
		// Advisory; the page cache is not ours to fill.
	case CmdBlockStatus:
		var ext []Extent
		if ext, err = c.extents(ctx, q); err == nil {
			c.sendBlockStatus(q, ext)
			return
		}
	case CmdFlush:
		if c.readOnly {
			// A read-only connection wrote nothing, so there is nothing
			// to fence; its flush still reaches the disk (CAN_MULTI_CONN).
			err = bk.Flush(ctx)
			break
		}
		err = c.write(ctx, q, payload)
	default:
		err = c.write(ctx, q, payload)
	}
	if err != nil {
		c.log.Debug("nbd: request failed", "command", q.Command, "offset", q.Offset, "length", q.Length, "error", err)
		msg := err.Error()
		var re *RequestError
		if errors.As(err, &re) {
			msg = re.Message // our own refusal, worded for the client
		}
		c.sendError(q, errnoOf(err), msg)
		return
	}
	c.sendOK(q)
}

// write runs a write-class request (WRITE, WRITE_ZEROES, TRIM, FLUSH)
// under the export's fence.
func (c *serverConn) write(ctx context.Context, q Request, payload []byte) error {
	release, errno, msg := c.beginWrite()
	if errno != 0 {
		return &RequestError{Errno: errno, Message: msg}
	}
	defer release()
	bk := c.exp.Backend
	off, n := int64(q.Offset), int64(q.Length)
	var err error
	switch {
	case q.Command == CmdFlush:
		return bk.Flush(ctx)
	case n == 0:
		return nil
	case q.Command == CmdWrite:
		err = bk.WriteAt(ctx, payload, off)
	case q.Command == CmdWriteZeroes && q.Flags&CmdFlagNoHole != 0:
		err = bk.WriteZeroes(ctx, off, n)
	default:
		// TRIM, and WRITE_ZEROES that may punch holes: Discard leaves
		// zeroes, which both allow.
		err = bk.Discard(ctx, off, n)
	}
	if err == nil && q.Flags&CmdFlagFUA != 0 {
		err = bk.Flush(ctx)
	}
	return err
}

// beginWrite admits a write-class request under the export's fence; the
// caller calls release once the backend is done with it. A connection
// presenting a newer epoch than the current one activates it here, on
// its first write or flush.
func (c *serverConn) beginWrite() (release func(), errno Errno, msg string) {
	x := c.exp
	if x.Epochs == nil {
		return func() {}, 0, ""
	}
	for {
		x.fence.RLock()
		cur := x.epoch.Load()
		if c.fenced.Load() || c.epoch < cur {
			x.fence.RUnlock()
			return nil, EPERM, fencedMessage(c.epoch, x)
		}
		if c.epoch == cur {
			return x.fence.RUnlock, 0, ""
		}
		x.fence.RUnlock()
		if err := c.srv.activate(x, c.epoch); err != nil {
			return nil, EIO, err.Error()
		}
	}
}

// activate makes epoch current on x: it waits for the writes in flight
// under older epochs, persists the epoch, and ends the connections that
// hold older ones.
func (s *Server) activate(x *export, epoch uint64) error {
	x.fence.Lock()
	var old []*serverConn
	if prev := x.epoch.Load(); epoch > prev {
		if err := x.Epochs.StoreEpoch(epoch); err != nil {
			x.fence.Unlock()
			return fmt.Errorf("export %q: persist epoch %d: %w", x.Name, epoch, err)
		}
		x.epoch.Store(epoch)
		x.mu.Lock()
		for c := range x.conns {
			if c.epoch != 0 && c.epoch < epoch {
				c.fenced.Store(true)
				old = append(old, c)
			}
		}
		x.mu.Unlock()
		s.log.Info("nbd: new epoch is current; older holders are fenced", "export", x.Name, "epoch", epoch, "previous", prev, "ended", len(old))
	}
	x.fence.Unlock()
	for _, c := range old {
		// Gracefully: requests it already read are answered (writes
		// among them with EPERM), then it closes.
		c.stop()
	}
	return nil
}

func (c *serverConn) extents(ctx context.Context, q Request) ([]Extent, error) {
	el, ok := c.exp.Backend.(ExtentLister)
	if !ok {
		return []Extent{{Length: q.Length}}, nil
	}
	ext, err := el.Extents(ctx, int64(q.Offset), int64(q.Length))
	if err != nil {
		return nil, err
	}
	if len(ext) == 0 {
		return nil, fmt.Errorf("backend reported no extents at %d", q.Offset)
	}
	var sum uint64
	for i, e := range ext {
		sum += uint64(e.Length)
		if e.Length == 0 || e.Length%c.exp.minBlock != 0 || sum > uint64(q.Length) {
			return nil, fmt.Errorf("backend reported an invalid extent %+v at %d", e, q.Offset)
		}
		if q.Flags&CmdFlagReqOne != 0 && i == 0 {
			return ext[:1], nil
		}
	}
	return ext, nil
}

// Replies. Each is written whole under wmu; the last writer to leave
// flushes, so replies completing together share a system call.

func (c *serverConn) send(hdr []byte, data []byte) {
	c.writers.Add(1)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr == nil {
		c.werr = c.fw.write(hdr, data)
	}
	if c.writers.Add(-1) == 0 && c.werr == nil {
		c.werr = c.fw.flush()
	}
	if c.werr != nil {
		// The client cannot be answered; end the connection so that it
		// sees the loss instead of waiting.
		c.raw.Close()
	}
}

func (c *serverConn) sendOK(q Request) {
	var b [simpleReplySize]byte
	c.send(AppendSimpleReply(b[:0], q.Cookie, 0), nil)
}

func (c *serverConn) sendData(q Request, data []byte) {
	if !c.structured {
		var b [simpleReplySize]byte
		c.send(AppendSimpleReply(b[:0], q.Cookie, 0), data)
		return
	}
	if len(data) == 0 {
		// A data chunk must carry a byte; a read must not get a simple
		// reply once structured replies are on.
		var b [structuredReplySize]byte
		c.send(AppendChunkHeader(b[:0], ReplyFlagDone, ChunkNone, q.Cookie, 0), nil)
		return
	}
	var b [structuredReplySize + 8]byte
	h := AppendChunkHeader(b[:0], ReplyFlagDone, ChunkOffsetData, q.Cookie, uint32(8+len(data)))
	c.send(be.AppendUint64(h, q.Offset), data)
}

func (c *serverConn) sendBlockStatus(q Request, ext []Extent) {
	p := AppendBlockStatus(nil, metaContextID, ext)
	h := AppendChunkHeader(nil, ReplyFlagDone, ChunkBlockStatus, q.Cookie, uint32(len(p)))
	c.send(h, p)
}

func (c *serverConn) sendError(q Request, errno Errno, msg string) {
	if !c.structured {
		var b [simpleReplySize]byte
		c.send(AppendSimpleReply(b[:0], q.Cookie, errno), nil)
		return
	}
	p := AppendErrorChunk(nil, ErrorChunk{Errno: errno, Message: msg})
	h := AppendChunkHeader(nil, ReplyFlagDone, ChunkError, q.Cookie, uint32(len(p)))
	c.send(h, p)
}
