package quorum

import (
	"context"
	"errors"
	"math/rand"
	"slices"
	"sync"
	"testing"
	"time"
)

func waitState(t *testing.T, e *Engine, i int, want ChildState) ChildStatus {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := e.Status()[i]
		if st.State == want {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("child %d is %s (%+v), want %s", i, st.State, st, want)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestResyncCopiesOnlyDirty: a child fails during a write burst, misses
// writes, answers again and gets exactly the regions it missed.
func TestResyncCopiesOnlyDirty(t *testing.T) {
	const region = 4096
	j := &fakeJournal{}
	r := newRig(t, 3, 1<<20, Config{RegionSize: region, Journal: j})
	defer r.e.Close()
	ctx := context.Background()
	r.kids[2].setInject(failOn(OpWrite))
	missed := map[int64]bool{}
	rng := rand.New(rand.NewSource(1))
	for range 50 {
		off := int64(rng.Intn(1<<20/512-16)) * 512
		n := (1 + rng.Intn(16)) * 512
		if err := r.e.WriteAt(ctx, pattern(byte(rng.Intn(255)+1), n), off); err != nil {
			t.Fatal(err)
		}
		for reg := off / region; reg <= (off+int64(n)-1)/region; reg++ {
			missed[reg] = true
		}
	}
	if err := r.e.Discard(ctx, 0, 3*region); err != nil {
		t.Fatal(err)
	}
	missed[0], missed[1], missed[2] = true, true, true
	st := r.e.Status()[2]
	if st.State != ChildFaulty || st.DirtyBytes != int64(len(missed))*region {
		t.Fatalf("status %+v, want faulty with %d dirty bytes", st, len(missed)*region)
	}
	r.kids[2].setInject(nil)
	before := r.kids[2].bytesWritten()
	// What a crash now would leave: the persisted map, plus the active
	// extents, must cover every missed region.
	rec, _ := j.last()
	if !slices.Equal(dirtyKeys(rec), []int{2}) {
		t.Fatalf("journal before resync: %+v", rec)
	}
	for reg := range missed {
		if !rec.Dirty[2].Test(reg) && !slices.Contains(rec.Active, reg*region/DefaultExtentSize) {
			t.Errorf("region %d missed but neither dirty nor active in the journal", reg)
		}
	}
	r.e.Probe(ctx)
	waitState(t, r.e, 2, ChildHealthy)
	if copied := r.kids[2].bytesWritten() - before; copied != int64(len(missed))*region {
		t.Errorf("resync copied %d bytes, want the %d dirty bytes", copied, len(missed)*region)
	}
	if rec, _ := j.last(); len(rec.Dirty) != 0 {
		t.Errorf("journal after resync still has dirty children: %v", dirtyKeys(rec))
	}
	r.assertIdentical(t)
	if st := r.e.Status()[2]; st.DirtyBytes != 0 || st.Error != "" {
		t.Errorf("status after resync %+v", st)
	}
}

// TestResyncUnderLoad: writes keep coming, with children completing in
// random orders, while a stale child resyncs; afterwards all agree.
func TestResyncUnderLoad(t *testing.T) {
	const size = 256 << 10
	for seed := int64(1); seed <= 3; seed++ {
		r := newRig(t, 3, size, Config{RegionSize: 4096})
		initial := NewBitmap(size, 4096)
		initial.SetRange(0, size)
		// Child 1 starts stale with garbage: a replacement.
		copy(r.kids[1].data, pattern(0xee, size))
		e, err := New(Config{RegionSize: 4096, Children: []Member{
			{Name: "c0", Child: r.kids[0]}, {Name: "c1", Child: r.kids[1], Dirty: initial}, {Name: "c2", Child: r.kids[2]},
		}})
		if err != nil {
			t.Fatal(err)
		}
		for i, k := range r.kids {
			k.setInject(randomDelay(seed*10+int64(i), 100*time.Microsecond))
		}
		ctx := context.Background()
		wait := seededWorkers(4, seed, func(w int, rng *rand.Rand) {
			for i := range 100 {
				off := int64(rng.Intn(size/512-8)) * 512
				if err := e.WriteAt(ctx, pattern(byte(w*100+i), 512*(1+rng.Intn(8))), off); err != nil {
					t.Errorf("write: %v", err)
					return
				}
				p := make([]byte, 4096)
				if err := e.ReadAt(ctx, p, off&^4095); err != nil {
					t.Errorf("read: %v", err)
					return
				}
			}
		})
		time.Sleep(2 * time.Millisecond)
		e.StartResync(1)
		wait()
		waitState(t, e, 1, ChildHealthy)
		e.Close()
		r.assertIdentical(t)
	}
}

// TestResyncingChildServesNoReads: until it is in sync, a resyncing child
// takes writes but is neither read nor counted.
func TestResyncingChildServesNoReads(t *testing.T) {
	r := newRig(t, 2, 64<<10, Config{VoteThreshold: 1, RegionSize: 4096, ReadPattern: ReadPatternFIFO})
	defer r.e.Close()
	ctx := context.Background()
	r.kids[0].setInject(failOn(OpWrite))
	if err := r.e.WriteAt(ctx, pattern(1, 4096), 0); err != nil {
		t.Fatal(err)
	}
	// Child 0 comes back, but its resync blocks on the region it missed.
	release := make(chan struct{})
	r.kids[0].setInject(func(op Op, off, _ int64) error {
		if op == OpWrite && off == 0 {
			<-release
		}
		return nil
	})
	r.e.Probe(ctx)
	waitState(t, r.e, 0, ChildResyncing)
	reads := r.kids[0].count(OpRead)
	p := make([]byte, 4096)
	if err := r.e.ReadAt(ctx, p, 8192); err != nil {
		t.Fatal(err)
	}
	if r.kids[0].count(OpRead) != reads {
		t.Error("a resyncing child was read")
	}
	// Writes reach it (not at the blocked region).
	if err := r.e.WriteAt(ctx, pattern(2, 4096), 16384); err != nil {
		t.Fatal(err)
	}
	if r.kids[0].snapshot()[16384] != 2 {
		t.Error("a resyncing child missed a write")
	}
	close(release)
	waitState(t, r.e, 0, ChildHealthy)
	r.assertIdentical(t)
}

// rigWithFaultyChild is three children of which the third failed eight
// writes, one every other 4 KiB region: faulty, with those regions dirty.
func rigWithFaultyChild(t *testing.T) *rig {
	t.Helper()
	r := newRig(t, 3, 64<<10, Config{RegionSize: 4096})
	r.kids[2].setInject(failOn(OpWrite))
	for i := range 8 {
		if err := r.e.WriteAt(context.Background(), pattern(byte(i+1), 4096), int64(i)*8192); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

// TestResyncFailureAndRetry: a child that fails again during resync goes
// back to faulty, keeps its remaining dirty regions, and a later probe
// finishes the job.
func TestResyncFailureAndRetry(t *testing.T) {
	r := rigWithFaultyChild(t)
	defer r.e.Close()
	ctx := context.Background()
	var n int
	var mu sync.Mutex
	r.kids[2].setInject(func(op Op, _, _ int64) error {
		mu.Lock()
		defer mu.Unlock()
		if op == OpWrite {
			n++
			if n == 3 {
				return errors.New("fails again")
			}
		}
		return nil
	})
	r.e.Probe(ctx)
	st := waitState(t, r.e, 2, ChildFaulty)
	if st.DirtyBytes == 0 || st.DirtyBytes == 8*4096 {
		t.Fatalf("after a failed resync: %+v, want some but not all regions left", st)
	}
	r.e.Probe(ctx)
	waitState(t, r.e, 2, ChildHealthy)
	r.assertIdentical(t)
}

// TestResyncNotStartedTwice: a resyncing child fails a write while its
// resync still waits on a copy; a probe meanwhile starts no second
// resync beside the first (which would find the dirty map cleared under
// it by the other's finish). Once the first has returned, the next probe
// resyncs the child.
func TestResyncNotStartedTwice(t *testing.T) {
	r := rigWithFaultyChild(t)
	defer r.e.Close()
	ctx := context.Background()
	hold, held := make(chan struct{}), make(chan struct{})
	var once, failOnce sync.Once
	r.kids[2].setInject(func(op Op, off, _ int64) error {
		failed := false
		if op == OpWrite && off == 4096 {
			failOnce.Do(func() { failed = true })
		}
		switch {
		case failed:
			return errors.New("fails a user's write")
		case op == OpWrite:
			once.Do(func() { close(held); <-hold })
		}
		return nil
	})
	r.e.Probe(ctx)
	<-held
	if err := r.e.WriteAt(ctx, pattern(9, 4096), 4096); err != nil {
		t.Fatal(err)
	}
	waitState(t, r.e, 2, ChildFaulty)
	r.e.Probe(ctx)
	if st := r.e.Status()[2]; st.State != ChildFaulty {
		t.Fatalf("a probe while the last resync still copies: %+v, want it left faulty", st)
	}
	close(hold)
	deadline := time.Now().Add(10 * time.Second)
	for r.e.Status()[2].State != ChildHealthy {
		if time.Now().After(deadline) {
			t.Fatalf("not resynced after the first resync returned: %+v", r.e.Status()[2])
		}
		r.e.Probe(ctx)
		time.Sleep(5 * time.Millisecond)
	}
	r.assertIdentical(t)
}

// TestFailedFlushDirtiesAll: a child that fails a flush may have lost any
// earlier write, so all of it is resynced.
func TestFailedFlushDirtiesAll(t *testing.T) {
	r := newRig(t, 3, 64<<10, Config{RegionSize: 4096})
	defer r.e.Close()
	r.kids[1].setInject(failOn(OpFlush))
	if err := r.e.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := r.e.Status()[1]; st.DirtyBytes != 64<<10 {
		t.Fatalf("status %+v, want all 64 KiB dirty", st)
	}
}

func TestBitmap(t *testing.T) {
	b := NewBitmap(10*4096+100, 4096)
	if b.Regions() != 11 {
		t.Fatalf("regions %d", b.Regions())
	}
	b.SetRange(4095, 2)
	b.SetRange(10*4096, 100)
	if got := []int64{b.Next(0), b.Next(1), b.Next(2), b.Next(11)}; got[0] != 0 || got[1] != 1 || got[2] != 10 || got[3] != -1 {
		t.Fatalf("next: %v", got)
	}
	if b.Count() != 3 || b.Bytes() != 2*4096+100 {
		t.Fatalf("count %d bytes %d", b.Count(), b.Bytes())
	}
	b.Clear(1)
	if b.Test(1) || !b.Test(0) {
		t.Fatal("clear")
	}
	big := NewBitmap(1<<30, 4096)
	big.Set(200000)
	if big.Next(64) != 200000 {
		t.Fatal("next across words")
	}
}
