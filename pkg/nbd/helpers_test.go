package nbd

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
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

func (m *memBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	m.check(off, int64(len(p)))
	if err := m.hook("read", off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(p, m.data[off:])
	return nil
}

func (m *memBackend) WriteAt(ctx context.Context, p []byte, off int64) error {
	m.check(off, int64(len(p)))
	if err := m.hook("write", off, int64(len(p))); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	return nil
}

func (m *memBackend) Flush(ctx context.Context) error { return m.hook("flush", 0, 0) }

func (m *memBackend) Discard(ctx context.Context, off, length int64) error {
	m.check(off, length)
	if err := m.hook("discard", off, length); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	return nil
}

func (m *memBackend) WriteZeroes(ctx context.Context, off, length int64) error {
	m.check(off, length)
	if err := m.hook("zero", off, length); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+length])
	return nil
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
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// logBuffer collects log lines for assertions.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
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
