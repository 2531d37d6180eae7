package quorum

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// standbyRig is an engine over three fake children started as a standby
// whose activator is the test's: it records what the children had seen
// when it ran and hands over what act returns.
type standbyRig struct {
	*rig
	j     *fakeJournal
	calls atomic.Int32
	// writesBefore counts write-class operations the children had seen
	// when the activator ran.
	writesBefore atomic.Int32
}

const standbySize = 1 << 20

func newStandbyRig(t *testing.T, cfg Config, act func(ctx context.Context) (Activation, error)) *standbyRig {
	t.Helper()
	s := &standbyRig{j: &fakeJournal{}}
	cfg.Journal = s.j
	cfg.RegionSize, cfg.ExtentSize, cfg.ActiveExtents = 4096, 64<<10, 4
	cfg.Standby = func(ctx context.Context, takeOver func(Activation) error) error {
		s.calls.Add(1)
		s.writesBefore.Store(int32(s.writeOps()))
		a, err := act(ctx)
		if err != nil {
			return err
		}
		err = takeOver(a)
		return err
	}
	s.rig = newRig(t, 3, standbySize, cfg)
	t.Cleanup(s.e.Close)
	return s
}

func (s *standbyRig) writeOps() int {
	n := 0
	for _, k := range s.kids {
		n += k.count(OpWrite) + k.count(OpFlush) + k.count(OpDiscard) + k.count(OpWriteZeroes)
	}
	return n
}

func inSync(n int) func(context.Context) (Activation, error) {
	return func(context.Context) (Activation, error) { return Activation{Dirty: make([]*Bitmap, n)}, nil }
}

// TestStandbyTakesNothingOver: a standby serves reads (with a corrupted
// child outvoted but not rewritten) and flushes (the kernel's, when a
// loop device is set up over it), and its flush, probe, scrub, shutdown
// and quiesce write nothing: no child sees a write-class request and the
// journal no record.
func TestStandbyTakesNothingOver(t *testing.T) {
	ctx := context.Background()
	s := newStandbyRig(t, Config{RewriteCorrupted: true}, inSync(3))
	s.fill(0, pattern(7, 8192))
	s.kids[2].corrupt = func(p []byte, _ int64) { p[0] ^= 0xff }
	buf := make([]byte, 8192)
	if err := s.e.ReadAt(ctx, buf, 0); err != nil || !bytes.Equal(buf, pattern(7, 8192)) {
		t.Fatalf("standby read: %v", err)
	}
	if err := s.e.Flush(ctx); err != nil {
		t.Errorf("flush of a standby: %v", err)
	}
	s.e.Probe(ctx)
	if err := s.e.Scrub(ctx, make([]byte, 4096), 0, &ScrubStats{}); !errors.Is(err, ErrStandby) {
		t.Errorf("scrub of a standby: %v, want ErrStandby", err)
	}
	if _, err := s.e.Quiesce(ctx); !errors.Is(err, ErrStandby) {
		t.Errorf("quiesce of a standby: %v, want ErrStandby", err)
	}
	if err := s.e.Shutdown(ctx); err != nil {
		t.Errorf("shutdown of a standby: %v", err)
	}
	if n := s.writeOps(); n != 0 {
		t.Errorf("children saw %d write-class requests from a standby", n)
	}
	if _, n := s.j.last(); n != 0 {
		t.Errorf("a standby committed %d journal records", n)
	}
	if !s.e.Standby() || s.calls.Load() != 0 {
		t.Errorf("standby %t after reads, activator ran %d times", s.e.Standby(), s.calls.Load())
	}
}

// TestStandbyActivatesOnFirstWriteClassRequest: each of write, discard
// and write-zeroes activates a standby before it reaches a child, and
// only the first request runs the activator.
func TestStandbyActivatesOnFirstWriteClassRequest(t *testing.T) {
	ctx := context.Background()
	for name, req := range map[string]func(e *Engine) error{
		"write":        func(e *Engine) error { return e.WriteAt(ctx, pattern(1, 4096), 0) },
		"discard":      func(e *Engine) error { return e.Discard(ctx, 0, 4096) },
		"write-zeroes": func(e *Engine) error { return e.WriteZeroes(ctx, 0, 4096) },
	} {
		t.Run(name, func(t *testing.T) {
			s := newStandbyRig(t, Config{}, inSync(3))
			if err := req(s.e); err != nil {
				t.Fatal(err)
			}
			if err := req(s.e); err != nil {
				t.Fatal(err)
			}
			if s.calls.Load() != 1 || s.writesBefore.Load() != 0 || s.e.Standby() {
				t.Fatalf("activator ran %d times, after %d child writes; standby %t", s.calls.Load(), s.writesBefore.Load(), s.e.Standby())
			}
			select {
			case <-s.e.Activated():
			default:
				t.Fatal("Activated not closed after the activation")
			}
		})
	}
}

// TestStandbyActivationRecovers: the activation applies what the last
// holder left: a child it had marked out of sync is not read and is
// resynced, and the extents it had in flight, where the children
// differ, are made identical from the first in-sync child.
func TestStandbyActivationRecovers(t *testing.T) {
	ctx := context.Background()
	s := newStandbyRig(t, Config{ReadPattern: ReadPatternFIFO}, func(context.Context) (Activation, error) {
		d := NewBitmap(standbySize, 4096)
		d.SetRange(0, 4096)
		return Activation{Dirty: []*Bitmap{d, nil, nil}, Active: []int64{1}}, nil
	})
	// Child 0 missed the holder's last write at 0; children 1 and 2
	// differ inside extent 1, where the holder had a write in flight.
	s.kids[1].fill(pattern(5, 4096), 0)
	s.kids[2].fill(pattern(5, 4096), 0)
	s.kids[1].fill(pattern(8, 4096), 64<<10)
	if err := s.e.WriteAt(ctx, pattern(9, 4096), 128<<10); err != nil {
		t.Fatal(err)
	}
	st, err := s.e.Recovered(ctx)
	if err != nil || st.Extents != 1 || st.Repaired != 64<<10 {
		t.Errorf("activation recovery: %+v, %v, want 1 extent, 64 KiB repaired", st, err)
	}
	buf := make([]byte, 4096)
	if err := s.e.ReadAt(ctx, buf, 0); err != nil || !bytes.Equal(buf, pattern(5, 4096)) {
		t.Fatalf("read of the region child 0 missed: %v %v", err, buf[:4])
	}
	waitHealthy(t, s.e, 0)
	s.assertIdentical(t)
}

func (f *fakeChild) fill(p []byte, off int) {
	f.mu.Lock()
	copy(f.data[off:], p)
	f.mu.Unlock()
}

func waitHealthy(t *testing.T, e *Engine, i int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); e.Faulty(i); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("child %d not back in sync: %+v", i, e.Status()[i])
		}
	}
}

// TestStandbyRequestsWaitForActivation: requests that arrive while an
// activation runs, reads included, wait for it; concurrent write-class
// requests share one activation.
func TestStandbyRequestsWaitForActivation(t *testing.T) {
	ctx := context.Background()
	release := make(chan struct{})
	running := make(chan struct{})
	s := newStandbyRig(t, Config{}, func(context.Context) (Activation, error) {
		close(running)
		<-release
		return Activation{Dirty: make([]*Bitmap, 3)}, nil
	})
	var wg sync.WaitGroup
	var done atomic.Int32
	errs := make(chan error, 9)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- s.e.WriteAt(ctx, pattern(byte(i+1), 4096), int64(i)*4096)
			done.Add(1)
		}()
	}
	<-running
	wg.Add(1)
	go func() {
		defer wg.Done()
		errs <- s.e.ReadAt(ctx, make([]byte, 4096), 0)
		done.Add(1)
	}()
	time.Sleep(20 * time.Millisecond)
	if n := done.Load(); n != 0 {
		t.Fatalf("%d requests completed during the activation", n)
	}
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if s.calls.Load() != 1 {
		t.Fatalf("activator ran %d times for concurrent writes", s.calls.Load())
	}
}

// TestStandbyActivationFailure: a failed activation fails the requests
// that waited for it with ErrActivation and its cause, writes nothing,
// leaves the engine a standby, and the next write tries again.
func TestStandbyActivationFailure(t *testing.T) {
	ctx := context.Background()
	var fail atomic.Bool
	fail.Store(true)
	cause := errors.New("replica b: fenced: epoch 3 is older than 4")
	s := newStandbyRig(t, Config{}, func(context.Context) (Activation, error) {
		if fail.Load() {
			return Activation{}, cause
		}
		return Activation{Dirty: make([]*Bitmap, 3)}, nil
	})
	err := s.e.WriteAt(ctx, pattern(1, 4096), 0)
	if !errors.Is(err, ErrActivation) || !errors.Is(err, cause) {
		t.Fatalf("write with a failing activation: %v", err)
	}
	if s.writeOps() != 0 || !s.e.Standby() {
		t.Fatalf("failed activation: %d child writes, standby %t", s.writeOps(), s.e.Standby())
	}
	fail.Store(false)
	if err := s.e.WriteAt(ctx, pattern(1, 4096), 0); err != nil {
		t.Fatalf("write after the cause went away: %v", err)
	}
	if s.calls.Load() != 2 || s.e.Standby() {
		t.Fatalf("activator ran %d times, standby %t", s.calls.Load(), s.e.Standby())
	}
}

// TestStandbyActivationNoChildInSync: an activation that finds no child
// in sync fails and touches no child.
func TestStandbyActivationNoChildInSync(t *testing.T) {
	s := newStandbyRig(t, Config{}, func(context.Context) (Activation, error) {
		all := NewBitmap(standbySize, 4096)
		all.SetRange(0, standbySize)
		return Activation{Dirty: []*Bitmap{all, all, all}}, nil
	})
	if err := s.e.WriteZeroes(context.Background(), 0, 4096); !errors.Is(err, ErrActivation) {
		t.Fatalf("write-zeroes: %v, want ErrActivation", err)
	}
	if s.writeOps() != 0 {
		t.Fatalf("%d child writes", s.writeOps())
	}
}

// TestFencedChildFencesTheEngine: a child that answers ErrFenced (a
// newer attachment took it over) fails the write that met it even though
// enough children took it, faults no child, commits no record, and every
// later write-class request fails at once; reads go on.
func TestFencedChildFencesTheEngine(t *testing.T) {
	ctx := context.Background()
	j := &fakeJournal{}
	r := newRig(t, 3, standbySize, Config{Journal: j, RegionSize: 4096, ExtentSize: 64 << 10, ActiveExtents: 4})
	defer r.e.Close()
	if err := r.e.WriteAt(ctx, pattern(1, 4096), 0); err != nil {
		t.Fatal(err)
	}
	_, records := j.last()
	r.kids[0].setInject(func(op Op, _, _ int64) error {
		if op == OpRead {
			return nil
		}
		return fmt.Errorf("replica a: %w", ErrFenced)
	})
	err := r.e.WriteAt(ctx, pattern(2, 4096), 4096)
	if !errors.Is(err, ErrFenced) || !errors.Is(err, ErrQuorumFailure) || !r.e.Fenced() {
		t.Fatalf("write that met the fence: %v", err)
	}
	before := r.kids[1].count(OpWrite)
	if err := r.e.Flush(ctx); !errors.Is(err, ErrFenced) {
		t.Fatalf("flush after the fence: %v", err)
	}
	if err := r.e.WriteAt(ctx, pattern(3, 4096), 0); !errors.Is(err, ErrFenced) {
		t.Fatalf("write after the fence: %v", err)
	}
	if n := r.kids[1].count(OpWrite); n != before {
		t.Errorf("a fenced engine sent %d more writes", n-before)
	}
	for _, st := range r.e.Status() {
		if st.State != ChildHealthy {
			t.Errorf("child %s: %s after a fence, want healthy (no fault)", st.Name, st.State)
		}
	}
	if _, n := j.last(); n != records {
		t.Errorf("a fenced engine committed %d records", n-records)
	}
	buf := make([]byte, 4096)
	if err := r.e.ReadAt(ctx, buf, 0); err != nil || buf[0] != 1 {
		t.Fatalf("read of a fenced engine: %v %d", err, buf[0])
	}
	// A fenced NBD client refuses reads too: they fail as fenced, and
	// the scrub stops, with no replica reported bad.
	r.kids[0].setInject(func(Op, int64, int64) error { return fmt.Errorf("replica a: %w", ErrFenced) })
	if err := r.e.ReadAt(ctx, buf, 0); !errors.Is(err, ErrFenced) {
		t.Fatalf("read refused by the fence: %v", err)
	}
	if err := r.e.Scrub(ctx, make([]byte, 4096), 0, &ScrubStats{}); !errors.Is(err, ErrFenced) {
		t.Fatalf("scrub of a fenced engine: %v", err)
	}
	for _, ev := range r.events.summary() {
		if ev != string(EventQuorumFailure) {
			t.Errorf("event %s from a fenced engine; want QUORUM_FAILURE only", ev)
		}
	}
}
