package nbd

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

// lifeBackend is one server process's view of a backend that outlives
// it (the replica file): once killed, it applies nothing more and
// answers nothing, as a process killed with SIGKILL would not. hold, if
// set, runs before an operation takes effect, so that a request can hang
// in the server when it dies.
type lifeBackend struct {
	*memBackend
	hold func(op string, off int64)

	mu     sync.RWMutex
	dead   bool
	buried chan struct{} // closed when the test ends: frees what the kill left hanging
}

var errKilled = errors.New("server process killed")

// startLife serves m through a lifeBackend as export "mem".
func startLife(t *testing.T, network string, m *memBackend, hold func(op string, off int64)) (*testServer, *lifeBackend) {
	life := &lifeBackend{memBackend: m, hold: hold, buried: make(chan struct{})}
	ts := startServer(t, network, ServerConfig{Exports: []Export{{Name: "mem", Backend: life}}})
	// Registered after the server's cleanup, so it runs before it: that
	// cleanup waits for the handlers hanging here.
	t.Cleanup(func() { close(life.buried) })
	return ts, life
}

func (l *lifeBackend) apply(op string, off int64, f func() error) error {
	if l.hold != nil {
		l.hold(op, off)
	}
	l.mu.RLock()
	if l.dead {
		l.mu.RUnlock()
		<-l.buried
		return errKilled
	}
	defer l.mu.RUnlock()
	return f()
}

func (l *lifeBackend) kill() {
	l.mu.Lock()
	l.dead = true
	l.mu.Unlock()
}

func (l *lifeBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	return l.apply("read", off, func() error { return l.memBackend.ReadAt(ctx, p, off) })
}

func (l *lifeBackend) WriteAt(ctx context.Context, p []byte, off int64) error {
	return l.apply("write", off, func() error { return l.memBackend.WriteAt(ctx, p, off) })
}

func (l *lifeBackend) Flush(ctx context.Context) error {
	return l.apply("flush", 0, func() error { return l.memBackend.Flush(ctx) })
}

func (l *lifeBackend) Discard(ctx context.Context, off, length int64) error {
	return l.apply("discard", off, func() error { return l.memBackend.Discard(ctx, off, length) })
}

func (l *lifeBackend) WriteZeroes(ctx context.Context, off, length int64) error {
	return l.apply("zero", off, func() error { return l.memBackend.WriteZeroes(ctx, off, length) })
}

// killServer ends a server as SIGKILL ends its process: its backend
// applies nothing more and its connections drop, with no reply to what
// they carried.
func killServer(ts *testServer, life *lifeBackend) {
	life.kill()
	ts.beginClose()
	ts.mu.Lock()
	for c := range ts.conns {
		c.raw.Close()
	}
	ts.mu.Unlock()
}

// closeAbruptly stops a server without waiting for handlers stuck in the
// backend (as a crash would).
func closeAbruptly(t *testing.T, ts *testServer) {
	ts.beginClose()
	ts.mu.Lock()
	for c := range ts.conns {
		c.raw.Close()
	}
	ts.mu.Unlock()
}

// restartOn serves exports on addr, where a server ran before, and stops
// it when the test ends. Without exports it serves b as "mem".
func restartOn(t *testing.T, network, addr string, b Backend, exports ...Export) *Server {
	t.Helper()
	if len(exports) == 0 {
		exports = []Export{{Name: "mem", Backend: b}}
	}
	s, err := NewServer(ServerConfig{Exports: exports, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	var l net.Listener
	for i := 0; ; i++ {
		if l, err = net.Listen(network, addr); err == nil {
			break
		}
		if i == 50 {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	done := make(chan struct{})
	go func() { s.Serve(l); close(done) }()
	t.Cleanup(func() { s.Close(); <-done })
	return s
}

func waitState(t *testing.T, c *Client, want State) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := c.State()
		if s == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("state %v (%v), want %v", s, err, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stateLog records a client's state changes.
type stateLog struct {
	testutil.Log[State]
}

func (l *stateLog) record(s State, _ error) { l.Add(s) }

// TestClientSurvivesServerRestart is a rolling upgrade seen from one
// client: the server process is killed in the middle of concurrent
// writes and reads, with one request hanging in its backend, and a new
// one starts on the same address 300ms later. Every request succeeds,
// none sees an error, and the export holds exactly what was written.
func TestClientSurvivesServerRestart(t *testing.T) {
	checkNoGoroutines(t)
	const size, block, workers = 4 << 20, 512, 8
	m := newMem(size, block)
	hung := make(chan struct{})
	var hangOnce sync.Once
	var life1 *lifeBackend
	s1, life1 := startLife(t, "tcp", m, func(op string, off int64) {
		if op == "write" && off == 0 {
			hangOnce.Do(func() { close(hung); <-life1.buried })
		}
	})
	var log stateLog
	c := dial(t, s1, Config{Export: "mem", Timeout: 10 * time.Second, MinBackoff: 10 * time.Millisecond, MaxBackoff: 80 * time.Millisecond, OnStateChange: log.record})
	ctx := context.Background()

	model := make([]byte, size)
	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, workers+1)
	// The hanging write: in flight, in the old server's backend, when
	// that server dies. It must be sent again and land.
	hangData := pattern(4096, 0x77)
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := c.WriteAt(ctx, hangData, 0); err != nil {
			errs <- err
		}
	}()
	<-hung
	copy(model, hangData)
	wl := &workload{c: c, model: model, block: block, maxBlocks: 32,
		kinds: []opKind{opWrite, opWrite, opZeroes, opRead}}
	span := int64(size/(workers+1)) / block * block
	wg.Add(1)
	go func() {
		defer wg.Done()
		for _, err := range wl.run(ctx, 2, 1, workers, span, func(int) bool { return !stop.Load() }) {
			errs <- err
		}
	}()
	time.Sleep(100 * time.Millisecond)
	killServer(s1, life1)
	before := wl.done.Load()
	time.Sleep(300 * time.Millisecond)
	if during := wl.done.Load() - before; during > workers {
		t.Errorf("%d requests completed while no server ran", during)
	}
	restartOn(t, "tcp", s1.Addr, m)
	waitState(t, c, Connected)
	after := wl.done.Load()
	time.Sleep(200 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("request across the restart: %v", err)
	}
	if wl.done.Load() == after {
		t.Error("no request completed after the restart")
	}
	if !bytes.Equal(m.snapshot(), model) {
		t.Error("the export differs from what the client wrote")
	}
	if s := log.All(); len(s) < 2 || s[0] != Disconnected || s[len(s)-1] != Connected {
		t.Errorf("state changes %v, want Disconnected ... Connected", s)
	}
}

// TestClientTimesOutWhileServerGone: a server that stays away longer
// than the timeout fails the requests that were in flight and those made
// meanwhile, each at its own deadline, with ErrDisconnected and
// context.DeadlineExceeded; a context's own deadline counts, too. When
// the server comes back, so does the client.
func TestClientTimesOutWhileServerGone(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	hung := make(chan struct{})
	var hangOnce sync.Once
	var life *lifeBackend
	s1, life := startLife(t, "tcp", m, func(op string, off int64) {
		if op == "read" {
			hangOnce.Do(func() { close(hung); <-life.buried })
		}
	})
	const timeout = 300 * time.Millisecond
	c := dial(t, s1, Config{Export: "mem", Timeout: timeout, MinBackoff: 10 * time.Millisecond, MaxBackoff: 40 * time.Millisecond})
	ctx := context.Background()
	if err := c.WriteAt(ctx, pattern(4096, 1), 0); err != nil {
		t.Fatal(err)
	}
	type result struct {
		err     error
		elapsed time.Duration
	}
	inFlight := make(chan result, 1)
	start := time.Now()
	go func() {
		err := c.ReadAt(ctx, make([]byte, 512), 0)
		inFlight <- result{err, time.Since(start)}
	}()
	<-hung
	killServer(s1, life)
	waitState(t, c, Disconnected)
	newStart := time.Now()
	err := c.WriteAt(ctx, pattern(512, 2), 512)
	newElapsed := time.Since(newStart)
	if !errors.Is(err, ErrDisconnected) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("write while the server is gone: %v, want ErrDisconnected and DeadlineExceeded", err)
	}
	if newElapsed < timeout-20*time.Millisecond || newElapsed > timeout+time.Second {
		t.Errorf("write while the server is gone failed after %v, want about %v", newElapsed, timeout)
	}
	r := <-inFlight
	if !errors.Is(r.err, context.DeadlineExceeded) {
		t.Errorf("read in flight at the kill: %v, want DeadlineExceeded", r.err)
	}
	if r.elapsed < timeout-20*time.Millisecond || r.elapsed > timeout+time.Second {
		t.Errorf("read in flight at the kill failed after %v, want about %v", r.elapsed, timeout)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	shortStart := time.Now()
	if err := c.Flush(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("flush with a 50ms context: %v", err)
	}
	if d := time.Since(shortStart); d > timeout {
		t.Errorf("flush with a 50ms context took %v: the context's deadline must win", d)
	}

	restartOn(t, "tcp", s1.Addr, m)
	waitState(t, c, Connected)
	got := make([]byte, 4096)
	if err := c.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, pattern(4096, 1)) {
		t.Fatalf("read after the server came back: %v", err)
	}
}

// TestClientFencedWhileReconnecting: requests wait for a reconnect, but
// a newer epoch takes the export over meanwhile; the reconnect is
// refused as fenced and the waiting requests fail at once with
// ErrFenced, long before their timeout, as do later ones.
func TestClientFencedWhileReconnecting(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	store := &MemEpochs{}
	life := &lifeBackend{memBackend: m, buried: make(chan struct{})}
	exports := func(b Backend) []Export { return []Export{{Name: "vol", Backend: b, Epochs: store}} }
	s1 := startServer(t, "tcp", ServerConfig{Exports: exports(life)})
	t.Cleanup(func() { close(life.buried) })
	a := dial(t, s1, Config{Export: "vol", Epoch: 1, Timeout: 10 * time.Second, MinBackoff: 400 * time.Millisecond, MaxBackoff: 400 * time.Millisecond})
	ctx := context.Background()
	if err := a.WriteAt(ctx, pattern(4096, 0xa), 0); err != nil {
		t.Fatal(err)
	}
	killServer(s1, life)
	waitState(t, a, Disconnected)
	waiting := make(chan error, 1)
	start := time.Now()
	go func() { waiting <- a.WriteAt(ctx, pattern(4096, 0xaa), 4096) }()

	// The server comes back, and epoch 2 takes it over before a retries
	// (its first attempt comes 200 to 400ms after the loss).
	restartOn(t, "tcp", s1.Addr, nil, exports(m)...)
	b := dial(t, &testServer{Network: "tcp", Addr: s1.Addr}, Config{Export: "vol", Epoch: 2})
	if err := b.WriteAt(ctx, pattern(4096, 0xb), 4096); err != nil {
		t.Fatal(err)
	}
	err := <-waiting
	if !IsFenced(err) {
		t.Fatalf("request waiting for a reconnect when a newer epoch took over: %v, want ErrFenced", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("the fenced request failed after %v, not at once", d)
	}
	if s, _ := a.State(); s != Fenced {
		t.Errorf("state %v after the refused reconnect, want Fenced", s)
	}
	if err := a.ReadAt(ctx, make([]byte, 512), 0); !IsFenced(err) {
		t.Errorf("request after fencing: %v, want ErrFenced", err)
	}
	if got := m.snapshot()[4096:8192]; !bytes.Equal(got, pattern(4096, 0xb)) {
		t.Error("the fenced holder's write landed after the takeover")
	}
}

// TestClientExportChangedFails: the server comes back with an export of
// another size under the same name. Waiting requests fail at once with
// ErrExportChanged instead of waiting for their timeout.
func TestClientExportChangedFails(t *testing.T) {
	checkNoGoroutines(t)
	s1, life := startLife(t, "tcp", newMem(1<<20, 512), nil)
	c := dial(t, s1, Config{Export: "mem", Timeout: 10 * time.Second, MinBackoff: 10 * time.Millisecond, MaxBackoff: 40 * time.Millisecond})
	ctx := context.Background()
	killServer(s1, life)
	waitState(t, c, Disconnected)
	waiting := make(chan error, 1)
	start := time.Now()
	go func() { waiting <- c.WriteAt(ctx, pattern(512, 1), 0) }()
	time.Sleep(50 * time.Millisecond)
	restartOn(t, "tcp", s1.Addr, newMem(2<<20, 512))
	if err := <-waiting; !errors.Is(err, ErrExportChanged) {
		t.Fatalf("request waiting when the export changed: %v, want ErrExportChanged", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("failed after %v, not at once", d)
	}
	if err := c.ReadAt(ctx, make([]byte, 512), 0); !errors.Is(err, ErrExportChanged) {
		t.Errorf("later request: %v, want ErrExportChanged", err)
	}
}

// TestClientCloseEndsWaiting: Close fails the requests waiting for a
// reconnect with ErrClosed.
func TestClientCloseEndsWaiting(t *testing.T) {
	checkNoGoroutines(t)
	s1, life := startLife(t, "unix", newMem(1<<20, 512), nil)
	c := dial(t, s1, Config{Export: "mem", Timeout: 10 * time.Second, MinBackoff: time.Hour})
	killServer(s1, life)
	waitState(t, c, Disconnected)
	waiting := make(chan error, 1)
	go func() { waiting <- c.ReadAt(context.Background(), make([]byte, 512), 0) }()
	time.Sleep(50 * time.Millisecond)
	c.Close()
	select {
	case err := <-waiting:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("request waiting at Close: %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close left a request waiting")
	}
}
