package quorum

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

var errInjected = errors.New("injected I/O error")

// fakeChild is an in-memory child with fault injection: inject runs before
// every operation and may delay it or fail it; corrupt alters what a read
// returns without touching the stored bytes (silent corruption).
type fakeChild struct {
	mu      sync.Mutex
	data    []byte
	inject  func(op Op, off, length int64) error
	corrupt func(p []byte, off int64)
	counts  map[Op]int
	written int64 // bytes changed by WriteAt, Discard and WriteZeroes
}

func newFake(size int) *fakeChild {
	return &fakeChild{data: make([]byte, size), counts: map[Op]int{}}
}

func (f *fakeChild) before(ctx context.Context, op Op, off, length int64) error {
	f.mu.Lock()
	f.counts[op]++
	inject := f.inject
	f.mu.Unlock()
	if inject != nil {
		if err := inject(op, off, length); err != nil {
			return err
		}
	}
	return ctx.Err()
}

func (f *fakeChild) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := f.before(ctx, OpRead, off, int64(len(p))); err != nil {
		return err
	}
	f.mu.Lock()
	copy(p, f.data[off:])
	corrupt := f.corrupt
	f.mu.Unlock()
	if corrupt != nil {
		corrupt(p, off)
	}
	return nil
}

func (f *fakeChild) WriteAt(ctx context.Context, p []byte, off int64) error {
	if err := f.before(ctx, OpWrite, off, int64(len(p))); err != nil {
		return err
	}
	f.mu.Lock()
	copy(f.data[off:], p)
	f.written += int64(len(p))
	f.mu.Unlock()
	return nil
}

func (f *fakeChild) bytesWritten() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.written
}

func (f *fakeChild) setInject(fn func(Op, int64, int64) error) {
	f.mu.Lock()
	f.inject = fn
	f.mu.Unlock()
}

func (f *fakeChild) zero(ctx context.Context, op Op, off, length int64) error {
	if err := f.before(ctx, op, off, length); err != nil {
		return err
	}
	f.mu.Lock()
	clear(f.data[off : off+length])
	f.written += length
	f.mu.Unlock()
	return nil
}

func (f *fakeChild) Discard(ctx context.Context, off, length int64) error {
	return f.zero(ctx, OpDiscard, off, length)
}

func (f *fakeChild) WriteZeroes(ctx context.Context, off, length int64) error {
	return f.zero(ctx, OpWriteZeroes, off, length)
}

func (f *fakeChild) Flush(ctx context.Context) error { return f.before(ctx, OpFlush, 0, 0) }

func (f *fakeChild) Size() int64 { return int64(len(f.data)) }

func (f *fakeChild) snapshot() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]byte(nil), f.data...)
}

func (f *fakeChild) count(op Op) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counts[op]
}

func failOn(ops ...Op) func(Op, int64, int64) error {
	return func(op Op, _, _ int64) error {
		for _, o := range ops {
			if o == op {
				return errInjected
			}
		}
		return nil
	}
}

// randomDelay makes every operation take a random time up to max, so that
// children complete requests in different orders.
func randomDelay(seed int64, max time.Duration) func(Op, int64, int64) error {
	var mu sync.Mutex
	rng := rand.New(rand.NewSource(seed))
	return func(Op, int64, int64) error {
		mu.Lock()
		d := time.Duration(rng.Int63n(int64(max)))
		mu.Unlock()
		time.Sleep(d)
		return nil
	}
}

// seededWorkers runs work in n goroutines, worker w with its own random
// source seeded from seed and w, so a failing seed replays; wait waits
// for them all.
func seededWorkers(n int, seed int64, work func(w int, rng *rand.Rand)) (wait func()) {
	var wg sync.WaitGroup
	for w := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			work(w, rand.New(rand.NewSource(seed*100+int64(w))))
		}()
	}
	return wg.Wait
}

// eventLog collects events for assertions.
type eventLog struct {
	testutil.Log[Event]
}

// summary lists events as "TYPE" or "TYPE:child" strings, in order.
func (l *eventLog) summary() []string {
	var out []string
	for _, e := range l.All() {
		s := string(e.Type)
		if e.Child != "" {
			s += ":" + e.Child
		}
		out = append(out, s)
	}
	return out
}

type rig struct {
	e      *Engine
	kids   []*fakeChild
	events *eventLog
}

func newRig(t *testing.T, n, size int, cfg Config) *rig {
	t.Helper()
	r := &rig{events: &eventLog{}}
	for i := range n {
		f := newFake(size)
		r.kids = append(r.kids, f)
		cfg.Children = append(cfg.Children, Member{Name: fmt.Sprintf("c%d", i), Child: f})
	}
	cfg.OnEvent = r.events.Add
	e, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	r.e = e
	return r
}

// fill stores the same bytes on every child directly.
func (r *rig) fill(off int, p []byte) {
	for _, k := range r.kids {
		copy(k.data[off:], p)
	}
}

func (r *rig) assertIdentical(t *testing.T) {
	t.Helper()
	want := r.kids[0].snapshot()
	for i, k := range r.kids[1:] {
		got := k.snapshot()
		for j := range want {
			if got[j] != want[j] {
				t.Fatalf("child %d differs from child 0 at byte %d", i+1, j)
			}
		}
	}
}

func pattern(b byte, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = b
	}
	return p
}

// fakeJournal keeps every committed record; fail and block let tests
// make commits fail or wait.
type fakeJournal struct {
	mu      sync.Mutex
	records []Record
	fail    error
	block   chan struct{}
	// refuse: these children do not store records (the others do).
	refuse map[int]error
}

func (j *fakeJournal) Commit(ctx context.Context, rec Record) error {
	j.mu.Lock()
	block, fail := j.block, j.fail
	j.mu.Unlock()
	if block != nil {
		<-block
	}
	if fail != nil {
		return fail
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	j.records = append(j.records, rec)
	failed := map[int]error{}
	for i, err := range j.refuse {
		if _, dirty := rec.Dirty[i]; !dirty {
			failed[i] = err
		}
	}
	if len(failed) > 0 {
		return &CommitError{Failed: failed}
	}
	return nil
}

func (j *fakeJournal) last() (Record, int) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if len(j.records) == 0 {
		return Record{}, 0
	}
	return j.records[len(j.records)-1], len(j.records)
}

func (j *fakeJournal) set(fail error, block chan struct{}) {
	j.mu.Lock()
	j.fail, j.block = fail, block
	j.mu.Unlock()
}

func dirtyKeys(rec Record) []int {
	var out []int
	for i := range rec.Dirty {
		out = append(out, i)
	}
	slices.Sort(out)
	return out
}
