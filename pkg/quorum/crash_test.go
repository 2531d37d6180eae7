package quorum

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
)

var errCrashed = errors.New("crashed")

// world counts every child operation and journal commit; from step
// crashAt on, nothing is applied any more: the machine is gone.
type world struct {
	steps   atomic.Int64
	crashAt int64
}

func (w *world) alive() bool { return w.steps.Add(1) <= w.crashAt }

type crashJournal struct {
	fakeJournal
	w *world
}

func (j *crashJournal) Commit(ctx context.Context, rec Record) error {
	if !j.w.alive() {
		return errCrashed
	}
	return j.fakeJournal.Commit(ctx, rec)
}

// writerLog is what one writer knows: for each slot, the last
// acknowledged content and the content in flight when the crash came.
type writerLog struct {
	acked    map[int64][]byte
	inFlight map[int64][]byte
}

const (
	crashSize   = 256 << 10
	crashRegion = 4096
	crashExtent = 16 << 10
	slotSize    = 8192
)

// runUntilCrash runs 3 writers over disjoint slots until the crash;
// child 2 fails every write from step failAt on (a replica lost before
// the crash), when failAt > 0.
func runUntilCrash(t *testing.T, crashAt, failAt int64) ([]*fakeChild, *crashJournal, []*writerLog, int64) {
	w := &world{crashAt: crashAt}
	j := &crashJournal{w: w}
	kids := []*fakeChild{newFake(crashSize), newFake(crashSize), newFake(crashSize)}
	var members []Member
	for i, k := range kids {
		k.inject = func(op Op, _, _ int64) error {
			if !w.alive() {
				return errCrashed
			}
			if i == 2 && failAt > 0 && w.steps.Load() >= failAt && op != OpRead {
				return errInjected
			}
			return nil
		}
		members = append(members, Member{Name: fmt.Sprint("c", i), Child: k})
	}
	e, err := New(Config{Children: members, Journal: j, RegionSize: crashRegion, ExtentSize: crashExtent, ActiveExtents: 3})
	if err != nil {
		t.Fatal(err)
	}
	logs := make([]*writerLog, 3)
	var wg sync.WaitGroup
	for wr := range 3 {
		logs[wr] = &writerLog{acked: map[int64][]byte{}, inFlight: map[int64][]byte{}}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			for i := range 24 {
				// Writer wr owns slots wr, wr+3, ...: disjoint areas that
				// spread over more extents than the intent log holds.
				slot := int64(wr + 3*(i%10))
				p := pattern(byte(1+wr*24+i), slotSize)
				logs[wr].inFlight[slot] = p
				if err := e.WriteAt(ctx, p, slot*slotSize); err != nil {
					return // the crash: the write was not acknowledged
				}
				delete(logs[wr].inFlight, slot)
				logs[wr].acked[slot] = p
				if i%7 == 6 {
					if e.Flush(ctx) != nil {
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	e.Close()
	for _, k := range kids {
		k.inject = nil
	}
	return kids, j, logs, w.steps.Load()
}

// reattach builds a new engine over the crashed children from the last
// committed record, recovers, resyncs and checks the invariants.
func reattach(t *testing.T, kids []*fakeChild, j *crashJournal, logs []*writerLog) {
	t.Helper()
	rec, _ := j.last()
	var members []Member
	for i, k := range kids {
		m := Member{Name: fmt.Sprint("c", i), Child: k}
		if d := rec.Dirty[i]; d != nil {
			m.Dirty = d
		}
		members = append(members, m)
	}
	j2 := &fakeJournal{}
	e, err := New(Config{Children: members, Journal: j2, RegionSize: crashRegion, ExtentSize: crashExtent, ActiveExtents: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	e.Recover(rec.Active)
	// A read while recovery runs in the background recovers what it
	// touches first: it must see what the volume holds afterwards.
	early := make([]byte, e.Size())
	earlyErr := e.ReadAt(context.Background(), early, 0)
	if _, err := e.Recovered(context.Background()); err != nil {
		t.Fatalf("recover: %v", err)
	}
	for i := range kids {
		e.StartResync(i)
	}
	for i := range kids {
		waitState(t, e, i, ChildHealthy)
	}
	want := kids[0].snapshot()
	for i, k := range kids[1:] {
		if !bytes.Equal(k.snapshot(), want) {
			t.Fatalf("child %d differs after recovery (record %+v)", i+1, rec)
		}
	}
	if earlyErr == nil && !bytes.Equal(early, want) {
		t.Fatalf("a read during recovery saw other bytes than the volume holds after it (record %+v)", rec)
	}
	for wr, l := range logs {
		for slot, p := range l.acked {
			got := want[slot*slotSize : (slot+1)*slotSize]
			if bytes.Equal(got, p) {
				continue
			}
			if f, ok := l.inFlight[slot]; ok && bytes.Equal(got, f) {
				continue // overwritten by the write in flight at the crash
			}
			t.Fatalf("writer %d slot %d: acknowledged write lost", wr, slot)
		}
	}
}

// TestCrashRecovery crashes at every step of a concurrent write workload
// (each child write, flush and journal commit is a step) and checks,
// after recovery from the last committed record: replicas identical,
// every acknowledged write present.
func TestCrashRecovery(t *testing.T) {
	for _, failAt := range []int64{0, 40} {
		_, _, _, total := runUntilCrash(t, 1<<40, failAt)
		for crashAt := int64(0); crashAt <= total; crashAt++ {
			t.Run(fmt.Sprintf("fail=%d/crash=%d", failAt, crashAt), func(t *testing.T) {
				kids, j, logs, _ := runUntilCrash(t, crashAt, failAt)
				reattach(t, kids, j, logs)
			})
		}
	}
}
