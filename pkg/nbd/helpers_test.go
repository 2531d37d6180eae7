package nbd

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

// memBackend is an in-memory Backend with a block size and fault hooks.
// before runs ahead of every operation and may delay or fail it.
type memBackend struct {
	mu     sync.Mutex
	data   []byte
	block  int64
	before func(op string, off, length int64) error
	ops    map[string]int
	holes  bool // report all-zero blocks as holes in Extents
}

func newMem(size, block int64) *memBackend {
	return &memBackend{data: make([]byte, size), block: block, ops: map[string]int{}}
}

func (m *memBackend) hook(op string, off, length int64) error {
	m.mu.Lock()
	m.ops[op]++
	before := m.before
	m.mu.Unlock()
	if before != nil {
		return before(op, off, length)
	}
	return nil
}

func (m *memBackend) setBefore(f func(op string, off, length int64) error) {
	m.mu.Lock()
	m.before = f
	m.mu.Unlock()
}

// stall has each op of m at offset at (any offset when at < 0)
// announce itself on the returned channel and then call hold before it
// runs, so that a test knows the request is in flight in the backend.
// The channel keeps the first n announcements.
func (m *memBackend) stall(op string, at int64, n int, hold func()) <-chan struct{} {
	entered := make(chan struct{}, n)
	m.setBefore(func(o string, off, length int64) error {
		if o == op && (at < 0 || off == at) {
			select {
			case entered <- struct{}{}:
			default:
			}
			hold()
		}
		return nil
	})
	return entered
}

// writeInFlight starts a write through c and returns its result once
// the backend has it, as entered (from stall) says.
func writeInFlight(c *Client, entered <-chan struct{}) <-chan error {
	errc := make(chan error, 1)
	go func() { errc <- c.WriteAt(context.Background(), pattern(512, 4), 0) }()
	<-entered
	return errc
}

func (m *memBackend) count(op string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ops[op]
}

func (m *memBackend) check(off, length int64) error {
	if off%m.block != 0 || length%m.block != 0 || off < 0 || off+length > int64(len(m.data)) {
		// The server must never let these through.
		panic(fmt.Sprintf("memBackend: bad request at %d length %d", off, length))
	}
	return nil
}

// do runs one request: the check, the hook, then f on the data, under
// the lock.
func (m *memBackend) do(op string, off, length int64, f func()) error {
	m.check(off, length)
	if err := m.hook(op, off, length); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	f()
	return nil
}

func (m *memBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	return m.do("read", off, int64(len(p)), func() { copy(p, m.data[off:]) })
}

func (m *memBackend) WriteAt(ctx context.Context, p []byte, off int64) error {
	return m.do("write", off, int64(len(p)), func() { copy(m.data[off:], p) })
}

func (m *memBackend) Flush(ctx context.Context) error { return m.hook("flush", 0, 0) }

func (m *memBackend) Discard(ctx context.Context, off, length int64) error {
	return m.do("discard", off, length, func() { clear(m.data[off : off+length]) })
}

func (m *memBackend) WriteZeroes(ctx context.Context, off, length int64) error {
	return m.do("zero", off, length, func() { clear(m.data[off : off+length]) })
}

func (m *memBackend) Size() int64      { return int64(len(m.data)) }
func (m *memBackend) BlockSize() int64 { return m.block }

func (m *memBackend) snapshot() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.data)
}

// holeyBackend adds Extents to memBackend: all-zero blocks are holes.
type holeyBackend struct{ *memBackend }

func (h holeyBackend) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []Extent
	zero := make([]byte, h.block)
	for o := off; o < off+length; o += h.block {
		var flags uint32
		if bytes.Equal(h.data[o:o+h.block], zero) {
			flags = StateHole | StateZero
		}
		if n := len(out); n > 0 && out[n-1].Flags == flags {
			out[n-1].Length += uint32(h.block)
		} else {
			out = append(out, Extent{Length: uint32(h.block), Flags: flags})
		}
	}
	return out, nil
}

// testLogger sends the package's logs to the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testutil.LogWriter(t), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testServer struct {
	*Server
	Network, Addr string
	done          chan error
}

// startServer serves cfg on a Unix socket (network "unix") or loopback
// TCP ("tcp") and stops it when the test ends.
func startServer(t testing.TB, network string, cfg ServerConfig) *testServer {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "nbd.sock")
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: s, Network: network, Addr: l.Addr().String(), done: make(chan error, 1)}
	go func() { ts.done <- s.Serve(l) }()
	t.Cleanup(func() {
		s.Close()
		<-ts.done
	})
	return ts
}

// dial connects a client to ts and closes it when the test ends.
func dial(t testing.TB, ts *testServer, cfg Config) *Client {
	t.Helper()
	cfg.Network, cfg.Addr = ts.Network, ts.Addr
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// checkNoGoroutines fails if goroutines of this package outlive the test:
// every connection, handler and reconnect loop must end.
func checkNoGoroutines(t testing.TB) {
	t.Helper()
	t.Cleanup(func() {
		var stacks string
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			stacks = ""
			for _, g := range strings.Split(string(buf), "\n\n") {
				if strings.Contains(g, "nbd.(*") && !strings.Contains(g, "checkNoGoroutines") && !strings.Contains(g, "testing.tRunner") {
					stacks += g + "\n\n"
				}
			}
			if stacks == "" {
				return
			}
		}
		t.Errorf("goroutines left behind:\n%s", stacks)
	})
}

// rawConn is a scripted client speaking through the codec, for tests of
// the server's handling of what our client never sends.
type rawConn struct {
	t  testing.TB
	nc net.Conn
}

func rawDial(t testing.TB, ts *testServer) *rawConn {
	t.Helper()
	nc, err := net.Dial(ts.Network, ts.Addr)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { nc.Close() })
	r := &rawConn{t: t, nc: nc}
	if _, err := ReadGreeting(nc); err != nil {
		t.Fatal(err)
	}
	if err := WriteClientFlags(nc, FlagCFixedNewstyle|FlagCNoZeroes); err != nil {
		t.Fatal(err)
	}
	return r
}

// opt sends an option and returns its replies up to the final one.
func (r *rawConn) opt(o Option, data []byte) []OptionReply {
	r.t.Helper()
	if err := WriteOption(r.nc, OptionRequest{Option: o, Data: data}); err != nil {
		r.t.Fatal(err)
	}
	var reps []OptionReply
	for {
		rep, err := ReadOptionReply(r.nc, 1<<20)
		if err != nil {
			r.t.Fatalf("%v: %v", o, err)
		}
		reps = append(reps, rep)
		if rep.Type == RepAck || rep.Type.IsError() {
			return reps
		}
	}
}

// goTo enters transmission on export name, with structured replies if
// asked.
func (r *rawConn) goTo(name string, structured bool) {
	r.t.Helper()
	if structured {
		if reps := r.opt(OptStructuredReply, nil); reps[0].Type != RepAck {
			r.t.Fatalf("structured reply: %v", reps[0].Type)
		}
	}
	reps := r.opt(OptGo, ExportRequest{Name: name, Infos: []InfoType{InfoBlockSize}}.Append(nil))
	if last := reps[len(reps)-1]; last.Type != RepAck {
		r.t.Fatalf("GO %s: %v %s", name, last.Type, last.Data)
	}
}

func (r *rawConn) send(q Request, payload []byte) {
	r.t.Helper()
	b := AppendRequest(nil, q)
	if _, err := r.nc.Write(append(b, payload...)); err != nil {
		r.t.Fatal(err)
	}
}

// simpleReply reads a simple reply and, for reads, n bytes of data.
func (r *rawConn) simpleReply(n int) (ReplyHeader, []byte) {
	r.t.Helper()
	h, err := ReadReplyHeader(r.nc)
	if err != nil {
		r.t.Fatal(err)
	}
	if h.Structured {
		r.t.Fatalf("structured reply %+v, want simple", h)
	}
	var data []byte
	if h.Errno == 0 && n > 0 {
		data = make([]byte, n)
		if _, err := io.ReadFull(r.nc, data); err != nil {
			r.t.Fatal(err)
		}
	}
	return h, data
}

// chunk reads one structured chunk and its payload.
func (r *rawConn) chunk() (ReplyHeader, []byte) {
	r.t.Helper()
	h, err := ReadReplyHeader(r.nc)
	if err != nil {
		r.t.Fatal(err)
	}
	if !h.Structured {
		return h, nil
	}
	p := make([]byte, h.Length)
	if _, err := io.ReadFull(r.nc, p); err != nil {
		r.t.Fatal(err)
	}
	return h, p
}

// closed reports whether the server closed the connection.
func (r *rawConn) closed() bool {
	r.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := r.nc.Read(make([]byte, 1))
	return err != nil
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7) + byte(i>>9)
	}
	return b
}

// opKind is a kind of request a workload sends.
type opKind int

const (
	opWrite opKind = iota
	opDiscard
	opZeroes
	opFlush
	opRead
)

// workload sends random requests through c and checks every read
// against model, what the export must hold. Its goroutines each keep to
// their own slice of the export, so the model stays exact while
// requests are pipelined and answered out of order.
type workload struct {
	c         *Client
	model     []byte
	block     int64
	maxBlocks int64    // a request is 1 to maxBlocks blocks long
	kinds     []opKind // drawn uniformly: repeat a kind to weight it
	done      atomic.Int64
}

// run starts goroutines first to last, goroutine w seeded with (w, seed)
// and sending requests within [w*span, (w+1)*span) while more allows,
// each stopping at its first error. It returns those errors.
func (wl *workload) run(ctx context.Context, seed uint64, first, last int, span int64, more func(i int) bool) []error {
	var wg sync.WaitGroup
	errs := make(chan error, last-first+1)
	for w := first; w <= last; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), seed))
			for i := 0; more(i); i++ {
				if err := wl.op(ctx, rng, int64(w)*span, span); err != nil {
					errs <- err
					return
				}
				wl.done.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	return all
}

// op sends one request at a block-aligned offset within
// [base, base+span) and applies what it did to the model.
func (wl *workload) op(ctx context.Context, rng *rand.Rand, base, span int64) error {
	n := (rng.Int64N(wl.maxBlocks) + 1) * wl.block
	off := base + rng.Int64N((span-n)/wl.block+1)*wl.block
	switch wl.kinds[rng.IntN(len(wl.kinds))] {
	case opWrite:
		p := pattern(int(n), byte(rng.IntN(256)))
		if err := wl.c.WriteAt(ctx, p, off); err != nil {
			return err
		}
		copy(wl.model[off:], p)
	case opDiscard:
		if err := wl.c.Discard(ctx, off, n); err != nil {
			return err
		}
		clear(wl.model[off : off+n])
	case opZeroes:
		if err := wl.c.WriteZeroes(ctx, off, n); err != nil {
			return err
		}
		clear(wl.model[off : off+n])
	case opFlush:
		return wl.c.Flush(ctx)
	case opRead:
		p := make([]byte, n)
		if err := wl.c.ReadAt(ctx, p, off); err != nil {
			return err
		}
		if !bytes.Equal(p, wl.model[off:off+n]) {
			return fmt.Errorf("read at %d: other bytes than written", off)
		}
	}
	return nil
}
