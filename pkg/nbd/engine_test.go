package nbd

import (
	"bytes"
	"context"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// TestEngineWithNBDChildren runs the quorum engine as it will run on a
// node: one local replica and two remote ones over NBD. One replica
// server dies in the middle of concurrent writes and stays away longer
// than the 2s timeout: the writes wait for it that long, then the engine
// marks that child faulty and every write still succeeds on the other
// two.
func TestEngineWithNBDChildren(t *testing.T) {
	checkNoGoroutines(t)
	const size = 8 << 20
	local, r1, r2 := newMem(size, 512), newMem(size, 512), newMem(size, 512)
	s1, s2 := memServer(t, "unix", r1), memServer(t, "unix", r2)
	c1 := dial(t, s1, Config{Export: "mem", Timeout: 2 * time.Second})
	c2 := dial(t, s2, Config{Export: "mem", Timeout: 2 * time.Second, MinBackoff: time.Hour})
	e := nodeEngine(t, local, c1, c2, nil)
	defer e.Close()
	ctx := context.Background()
	midway, wait := engineWrites(t, e, size, 50)
	<-midway
	closeAbruptly(t, s2)
	model := wait()
	if err := e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if !e.Faulty(2) || e.Faulty(0) || e.Faulty(1) {
		t.Fatalf("faulty children: %v %v %v, want only nbd-2", e.Faulty(0), e.Faulty(1), e.Faulty(2))
	}
	got := make([]byte, size)
	if err := e.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("engine read: %v", err)
	}
	if !bytes.Equal(local.snapshot(), model) || !bytes.Equal(r1.snapshot(), model) {
		t.Fatal("the healthy replicas differ from what the engine acknowledged")
	}
}

// TestEngineNBDChildSurvivesRestart is the rolling upgrade the client's
// resending is for: a replica server is killed in the middle of
// concurrent writes and is back on the same address 500ms later, well
// within the timeout. No child becomes faulty, no REPORT_BAD is raised,
// and every replica holds what the engine acknowledged.
func TestEngineNBDChildSurvivesRestart(t *testing.T) {
	checkNoGoroutines(t)
	const size = 8 << 20
	local, r1, r2 := newMem(size, 512), newMem(size, 512), newMem(size, 512)
	s1 := memServer(t, "unix", r1)
	s2, life2 := startLife(t, "tcp", r2, nil)
	c1 := dial(t, s1, Config{Export: "mem", Timeout: 10 * time.Second})
	c2 := dial(t, s2, Config{Export: "mem", Timeout: 10 * time.Second, MinBackoff: 20 * time.Millisecond})
	var events testutil.Log[quorum.Event]
	e := nodeEngine(t, local, c1, c2, events.Add)
	defer e.Close()
	ctx := context.Background()
	midway, wait := engineWrites(t, e, size, 30)
	<-midway
	killServer(s2, life2)
	time.Sleep(500 * time.Millisecond)
	restartOn(t, "tcp", s2.Addr, r2)
	model := wait()
	if err := e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if e.Faulty(i) {
			t.Errorf("child %d is faulty after a restart within the timeout", i)
		}
	}
	if bad := events.All(); len(bad) > 0 {
		t.Errorf("events across a restart within the timeout: %+v", bad)
	}
	for i, r := range []*memBackend{local, r1, r2} {
		if !bytes.Equal(r.snapshot(), model) {
			t.Errorf("replica %d differs from what the engine acknowledged", i)
		}
	}
}

// nodeEngine is the engine as a node runs it: a local replica and two
// remote ones over NBD, nbd-1 and nbd-2.
func nodeEngine(t *testing.T, local quorum.Child, c1, c2 *Client, onEvent func(quorum.Event)) *quorum.Engine {
	t.Helper()
	e, err := quorum.New(quorum.Config{Children: []quorum.Member{
		{Name: "local", Child: local}, {Name: "nbd-1", Child: c1}, {Name: "nbd-2", Child: c2},
	}, OnEvent: onEvent})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// engineWrites writes random data through e from 8 goroutines, 100
// writes each to its own eighth of the volume. midway closes when the
// first goroutine has made at writes; wait returns what the engine
// acknowledged.
func engineWrites(t *testing.T, e *quorum.Engine, size int64, at int) (midway <-chan struct{}, wait func() []byte) {
	ctx := context.Background()
	model := make([]byte, size)
	var mu sync.Mutex
	var wg sync.WaitGroup
	half := make(chan struct{})
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			span := size / 8
			for i := 0; i < 100; i++ {
				if w == 0 && i == at {
					close(half)
				}
				n := (rng.Int64N(16) + 1) * 4096
				off := int64(w)*span + rng.Int64N((span-n)/4096+1)*4096
				p := pattern(int(n), byte(rng.IntN(256)))
				if err := e.WriteAt(ctx, p, off); err != nil {
					t.Errorf("engine write: %v", err)
					return
				}
				mu.Lock()
				copy(model[off:], p)
				mu.Unlock()
			}
		}()
	}
	return half, func() []byte {
		wg.Wait()
		return model
	}
}
