package quorum

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestConfigValidation(t *testing.T) {
	tests := []struct {
		name    string
		n       int
		sizes   []int64
		cfg     Config
		wantT   int
		wantErr string
	}{
		{name: "default threshold is majority of 3", n: 3, wantT: 2},
		{name: "default threshold is majority of 4", n: 4, wantT: 3},
		{name: "default threshold of 1 child", n: 1, wantT: 1},
		{name: "threshold 1", n: 3, cfg: Config{VoteThreshold: 1}, wantT: 1},
		{name: "threshold N", n: 3, cfg: Config{VoteThreshold: 3}, wantT: 3},
		{name: "threshold above N", n: 3, cfg: Config{VoteThreshold: 4}, wantErr: "vote threshold 4 out of range: want 1 to 3"},
		{name: "negative threshold", n: 3, cfg: Config{VoteThreshold: -1}, wantErr: "out of range"},
		{name: "no children", n: 0, wantErr: "no children"},
		{name: "sizes differ", n: 2, sizes: []int64{4096, 8192}, wantErr: "children differ in size"},
		{name: "unknown read pattern", n: 2, cfg: Config{ReadPattern: "random"}, wantErr: `read pattern "random"`},
		{name: "rewrite needs quorum reads", n: 2, cfg: Config{ReadPattern: ReadPatternFIFO, RewriteCorrupted: true}, wantErr: "rewrite-corrupted needs"},
		{name: "strict needs quorum reads", n: 2, cfg: Config{ReadPattern: ReadPatternFIFO, Strict: true}, wantErr: "strict mode needs"},
		{name: "strict excludes rewrite", n: 2, cfg: Config{Strict: true, RewriteCorrupted: true}, wantErr: "exclude each other"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			for i := range tc.n {
				size := int64(4096)
				if tc.sizes != nil {
					size = tc.sizes[i]
				}
				cfg.Children = append(cfg.Children, Member{Name: fmt.Sprint(i), Child: newFake(int(size))})
			}
			e, err := New(cfg)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("New error = %v, want containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			if e.VoteThreshold() != tc.wantT {
				t.Errorf("threshold = %d, want %d", e.VoteThreshold(), tc.wantT)
			}
			if e.ReadPattern() != ReadPatternQuorum {
				t.Errorf("default read pattern = %s, want quorum", e.ReadPattern())
			}
		})
	}
}

// TestModifyRule covers the write rule for every modifying request: it
// succeeds when at least t children succeed, failed children are reported
// and become faulty.
func TestModifyRule(t *testing.T) {
	ops := []struct {
		op Op
		do func(e *Engine) error
	}{
		{OpWrite, func(e *Engine) error { return e.WriteAt(context.Background(), pattern(7, 512), 512) }},
		{OpWriteZeroes, func(e *Engine) error { return e.WriteZeroes(context.Background(), 512, 512) }},
		{OpDiscard, func(e *Engine) error { return e.Discard(context.Background(), 512, 512) }},
		{OpFlush, func(e *Engine) error { return e.Flush(context.Background()) }},
	}
	tests := []struct {
		fail      []bool
		threshold int
		wantOK    bool
	}{
		{[]bool{false, false, false}, 3, true},
		{[]bool{false, false, true}, 3, false},
		{[]bool{false, false, true}, 2, true},
		{[]bool{false, true, true}, 2, false},
		{[]bool{false, true, true}, 1, true},
		{[]bool{true, true, true}, 1, false},
		{[]bool{true}, 1, false},
		{[]bool{false}, 1, true},
	}
	for _, o := range ops {
		for _, tc := range tests {
			t.Run(fmt.Sprintf("%s/fail=%v/t=%d", o.op, tc.fail, tc.threshold), func(t *testing.T) {
				j := &fakeJournal{}
				r := newRig(t, len(tc.fail), 4096, Config{VoteThreshold: tc.threshold, Journal: j})
				var wantEvents []string
				var wantFaulted []int
				for i, f := range tc.fail {
					if f {
						r.kids[i].inject = failOn(o.op)
						wantEvents = append(wantEvents, fmt.Sprintf("REPORT_BAD:c%d", i))
						wantFaulted = append(wantFaulted, i)
					}
				}
				if !tc.wantOK {
					wantEvents = append(wantEvents, "QUORUM_FAILURE")
				}
				err := o.do(r.e)
				if tc.wantOK != (err == nil) {
					t.Fatalf("err = %v, want ok=%v", err, tc.wantOK)
				}
				if err != nil && !errors.Is(err, ErrQuorumFailure) {
					t.Errorf("err = %v, want ErrQuorumFailure", err)
				}
				got := r.events.summary()
				slices.Sort(got)
				slices.Sort(wantEvents)
				if !slices.Equal(got, wantEvents) {
					t.Errorf("events = %v, want %v", got, wantEvents)
				}
				rec, _ := j.last()
				if faulted := dirtyKeys(rec); !slices.Equal(faulted, wantFaulted) {
					t.Errorf("journal records faulty children %v, want %v", faulted, wantFaulted)
				}
				for i, f := range tc.fail {
					if r.e.Faulty(i) != f {
						t.Errorf("child %d faulty = %v, want %v", i, r.e.Faulty(i), f)
					}
				}
			})
		}
	}
}

// TestFaultyChildLeftOut: after a child failed a write it gets no more I/O,
// and the threshold counts healthy children only.
func TestFaultyChildLeftOut(t *testing.T) {
	r := newRig(t, 3, 4096, Config{VoteThreshold: 2})
	r.kids[2].inject = failOn(OpWrite)
	ctx := context.Background()
	if err := r.e.WriteAt(ctx, pattern(1, 512), 0); err != nil {
		t.Fatalf("first write: %v", err)
	}
	r.kids[2].inject = nil
	before := r.kids[2].count(OpWrite) + r.kids[2].count(OpRead)
	if err := r.e.WriteAt(ctx, pattern(2, 512), 0); err != nil {
		t.Fatalf("second write: %v", err)
	}
	p := make([]byte, 512)
	if err := r.e.ReadAt(ctx, p, 0); err != nil {
		t.Fatalf("read: %v", err)
	}
	if after := r.kids[2].count(OpWrite) + r.kids[2].count(OpRead); after != before {
		t.Errorf("faulty child got %d more requests", after-before)
	}
	if st := r.e.Status(); st[2].State != ChildFaulty || !strings.Contains(st[2].Error, "injected") {
		t.Errorf("status = %+v", st)
	}
	// One more failure leaves one healthy child, below the threshold.
	r.kids[1].inject = failOn(OpWrite)
	if err := r.e.WriteAt(ctx, pattern(3, 512), 0); !errors.Is(err, ErrQuorumFailure) {
		t.Fatalf("write with 1 healthy of threshold 2: err = %v", err)
	}
	if err := r.e.ReadAt(ctx, p, 0); !errors.Is(err, ErrQuorumFailure) {
		t.Fatalf("read with 1 healthy of threshold 2: err = %v", err)
	}
}

// TestJournalFailureFailsWrite: a write is not acknowledged when the
// fact that a replica missed it cannot be kept.
func TestJournalFailureFailsWrite(t *testing.T) {
	j := &fakeJournal{}
	r := newRig(t, 3, 4096, Config{VoteThreshold: 1, Journal: j})
	j.set(errors.New("metadata disk gone"), nil)
	r.kids[1].inject = failOn(OpWrite)
	err := r.e.WriteAt(context.Background(), pattern(1, 512), 0)
	if !errors.Is(err, ErrQuorumFailure) || !strings.Contains(err.Error(), "metadata disk gone") {
		t.Fatalf("err = %v", err)
	}
	// While the record fails, every write fails, even those that never
	// touched the faulty child; once it succeeds, writes succeed again.
	if err := r.e.WriteAt(context.Background(), pattern(1, 512), 0); !errors.Is(err, ErrQuorumFailure) {
		t.Fatalf("write while the record fails: %v", err)
	}
	j.set(nil, nil)
	if err := r.e.WriteAt(context.Background(), pattern(1, 512), 0); err != nil {
		t.Fatalf("write after the record succeeded: %v", err)
	}
	if rec, _ := j.last(); !slices.Equal(dirtyKeys(rec), []int{1}) {
		t.Errorf("record %+v, want child 1 dirty", rec)
	}
}

// TestJournalRefusedByChild: a child that cannot store a record is
// faulted (its data is fine, but the next attach could not learn from
// it) while the others still form a quorum; when too few store it, the
// write fails.
func TestJournalRefusedByChild(t *testing.T) {
	for _, tc := range []struct {
		name    string
		refuse  []int
		wantErr bool
	}{
		{"one of three", []int{2}, false},
		{"two of three", []int{1, 2}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			j := &fakeJournal{refuse: map[int]error{}}
			r := newRig(t, 3, 1<<20, Config{Journal: j})
			for _, i := range tc.refuse {
				j.refuse[i] = errors.New("journal unreachable")
			}
			err := r.e.WriteAt(context.Background(), pattern(1, 512), 0)
			if tc.wantErr {
				if err == nil {
					t.Fatal("write acknowledged with the record stored by 1 of 3")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !r.e.Faulty(2) || r.e.Faulty(0) || r.e.Faulty(1) {
				t.Fatalf("faulty: %v %v %v, want only child 2", r.e.Faulty(0), r.e.Faulty(1), r.e.Faulty(2))
			}
			if rec, _ := j.last(); !slices.Equal(dirtyKeys(rec), []int{2}) {
				t.Errorf("last record %+v, want child 2 dirty", rec)
			}
			if ev := r.events.All(); len(ev) != 1 || ev[0].Op != OpJournal || ev[0].Child != "c2" {
				t.Errorf("events %+v, want one REPORT_BAD journal for c2", ev)
			}
		})
	}
}

// TestFaultCommittedBeforeAck: a request that failed on a child, or
// skipped it because it is faulty, completes only after the journal has
// the child.
func TestFaultCommittedBeforeAck(t *testing.T) {
	j := &fakeJournal{}
	r := newRig(t, 2, 1<<20, Config{VoteThreshold: 1, Journal: j})
	// Warm the write intent so the writes below need no intent commit.
	for i := range 2 {
		if err := r.e.WriteAt(context.Background(), pattern(1, 512), int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	release := make(chan struct{})
	j.set(nil, release)
	r.kids[1].inject = failOn(OpWrite)
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.e.WriteAt(context.Background(), pattern(2, 512), int64(i)*4096); err != nil {
				t.Errorf("write %d: %v", i, err)
			}
			if rec, _ := j.last(); !slices.Equal(dirtyKeys(rec), []int{1}) {
				t.Errorf("write %d completed before the faulty child was recorded", i)
			}
		}()
	}
	time.Sleep(20 * time.Millisecond)
	close(release)
	wg.Wait()
}

func TestOutOfRange(t *testing.T) {
	r := newRig(t, 2, 4096, Config{})
	ctx := context.Background()
	for _, err := range []error{
		r.e.ReadAt(ctx, make([]byte, 512), 4096-256),
		r.e.WriteAt(ctx, make([]byte, 512), -512),
		r.e.Discard(ctx, 0, 8192),
		r.e.WriteZeroes(ctx, 4096, 1),
	} {
		if !errors.Is(err, ErrOutOfRange) {
			t.Errorf("err = %v, want ErrOutOfRange", err)
		}
	}
}

// TestOverlappingWritesIdentical: concurrent overlapping writes, discards
// and write-zeroes, with children completing in random orders, leave the
// children byte-identical.
func TestOverlappingWritesIdentical(t *testing.T) {
	const size = 64 << 10
	for seed := int64(1); seed <= 4; seed++ {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			r := newRig(t, 3, size, Config{})
			for i, k := range r.kids {
				k.inject = randomDelay(seed*10+int64(i), 200*time.Microsecond)
			}
			wait := seededWorkers(8, seed, func(w int, rng *rand.Rand) {
				ctx := context.Background()
				for i := range 60 {
					off := int64(rng.Intn(size/512)) * 512
					length := int64(1+rng.Intn(16)) * 512
					length = min(length, size-off)
					var err error
					switch rng.Intn(6) {
					case 0:
						err = r.e.Discard(ctx, off, length)
					case 1:
						err = r.e.WriteZeroes(ctx, off, length)
					default:
						err = r.e.WriteAt(ctx, pattern(byte(w*60+i), int(length)), off)
					}
					if err != nil {
						t.Errorf("op: %v", err)
						return
					}
				}
			})
			wait()
			r.assertIdentical(t)
		})
	}
}

// TestReadNeverSeesHalfWrite: under strict mode any read that observed a
// write on some children but not others would fail; every 512-byte block
// is written whole with one value, so a read must see uniform blocks.
func TestReadNeverSeesHalfWrite(t *testing.T) {
	const size = 32 << 10
	r := newRig(t, 3, size, Config{VoteThreshold: 1, Strict: true})
	for i, k := range r.kids {
		k.inject = randomDelay(int64(i), 300*time.Microsecond)
	}
	var wg sync.WaitGroup
	ctx := context.Background()
	for w := range 4 {
		wg.Add(2)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(w)))
			for i := range 80 {
				off := int64(rng.Intn(size/512-4)) * 512
				if err := r.e.WriteAt(ctx, pattern(byte(i+w), 512*(1+rng.Intn(4))), off); err != nil {
					t.Errorf("write: %v", err)
					return
				}
			}
		}()
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(w + 50)))
			p := make([]byte, 4*512)
			for range 80 {
				off := int64(rng.Intn(size/512-4)) * 512
				if err := r.e.ReadAt(ctx, p, off); err != nil {
					t.Errorf("read observed a half-applied write: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	r.assertIdentical(t)
}

// gate blocks writes at offset 0 on a child until released.
func gate(release chan struct{}, started chan struct{}) func(Op, int64, int64) error {
	var once sync.Once
	return func(op Op, off, _ int64) error {
		if op == OpWrite && off == 0 {
			once.Do(func() { close(started) })
			<-release
		}
		return nil
	}
}

func TestDisjointRequestsDoNotWait(t *testing.T) {
	r := newRig(t, 2, 64<<10, Config{})
	release, started := make(chan struct{}), make(chan struct{})
	r.kids[0].inject = gate(release, started)
	ctx := context.Background()
	blocked := make(chan error, 1)
	go func() { blocked <- r.e.WriteAt(ctx, pattern(1, 4096), 0) }()
	<-started

	done := make(chan error, 3)
	go func() { done <- r.e.WriteAt(ctx, pattern(2, 4096), 8192) }()
	go func() { done <- r.e.ReadAt(ctx, make([]byte, 4096), 16384) }()
	go func() { done <- r.e.Flush(ctx) }()
	for range 3 {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a request on a disjoint range waited for a blocked write")
		}
	}
	overlapping := make(chan error, 1)
	go func() { overlapping <- r.e.ReadAt(ctx, make([]byte, 512), 2048) }()
	select {
	case err := <-overlapping:
		t.Fatalf("overlapping read completed while the write was half applied: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if err := <-blocked; err != nil {
		t.Fatal(err)
	}
	if err := <-overlapping; err != nil {
		t.Fatal(err)
	}
}

func TestRangeWaitHonoursContext(t *testing.T) {
	r := newRig(t, 2, 64<<10, Config{})
	release, started := make(chan struct{}), make(chan struct{})
	r.kids[0].inject = gate(release, started)
	blocked := make(chan error, 1)
	go func() { blocked <- r.e.WriteAt(context.Background(), pattern(1, 4096), 0) }()
	<-started
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := r.e.WriteAt(ctx, pattern(2, 512), 512); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	close(release)
	if err := <-blocked; err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 4096)
	if err := r.e.ReadAt(context.Background(), p, 0); err != nil || !bytes.Equal(p, pattern(1, 4096)) {
		t.Fatalf("read after cancelled write: %v %x", err, p[:2])
	}
}

// TestOracle runs random operation sequences against the engine and a
// plain byte slice; one child silently corrupts a region and another fails
// some reads, and quorum reads must still return the model's bytes.
func TestOracle(t *testing.T) {
	const size = 16 << 10
	for seed := int64(0); seed < 20; seed++ {
		rng := rand.New(rand.NewSource(seed))
		r := newRig(t, 3, size, Config{RewriteCorrupted: seed%2 == 0})
		r.kids[1].corrupt = func(p []byte, off int64) {
			if off < 1024 && len(p) > 0 {
				p[0] ^= 0xff
			}
		}
		var readN atomic.Int64
		// Failures only where child 1 is sound: two bad of three is
		// beyond what a threshold of 2 can mask.
		r.kids[2].inject = func(op Op, off, _ int64) error {
			if op == OpRead && off >= 1024 && readN.Add(1)%3 == 0 {
				return errInjected
			}
			return nil
		}
		model := make([]byte, size)
		ctx := context.Background()
		for range 200 {
			off := int64(rng.Intn(size/512)) * 512
			length := min(int64(1+rng.Intn(8))*512, size-off)
			switch rng.Intn(4) {
			case 0:
				p := make([]byte, length)
				rng.Read(p)
				if err := r.e.WriteAt(ctx, p, off); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], p)
			case 1:
				if err := r.e.Discard(ctx, off, length); err != nil {
					t.Fatal(err)
				}
				clear(model[off : off+length])
			default:
				p := make([]byte, length)
				if err := r.e.ReadAt(ctx, p, off); err != nil {
					t.Fatalf("seed %d: read at %d: %v", seed, off, err)
				}
				if !bytes.Equal(p, model[off:off+length]) {
					t.Fatalf("seed %d: read at %d length %d differs from the model", seed, off, length)
				}
			}
		}
	}
}

// TestQuiesce: a quiesce waits for the write in flight, holds the next
// one, leaves every child flushed with the write intent empty, and lets
// the held write through on resume.
func TestQuiesce(t *testing.T) {
	j := &fakeJournal{}
	r := newRig(t, 3, 1<<20, Config{Journal: j})
	ctx := context.Background()
	inFlight := make(chan struct{})
	proceed := make(chan struct{})
	r.kids[0].setInject(func(op Op, off, _ int64) error {
		if op == OpWrite && off == 0 {
			close(inFlight)
			<-proceed
		}
		return nil
	})
	first := make(chan error, 1)
	go func() { first <- r.e.WriteAt(ctx, pattern(1, 4096), 0) }()
	<-inFlight
	quiesced := make(chan func(), 1)
	go func() {
		resume, err := r.e.Quiesce(ctx)
		if err != nil {
			t.Errorf("quiesce: %v", err)
		}
		quiesced <- resume
	}()
	select {
	case <-quiesced:
		t.Fatal("quiesce returned while a write was in flight")
	case <-time.After(20 * time.Millisecond):
	}
	close(proceed)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	resume := <-quiesced
	r.kids[0].setInject(nil)
	for i, k := range r.kids {
		if k.counts[OpFlush] == 0 {
			t.Errorf("child %d not flushed by the quiesce", i)
		}
	}
	if rec, _ := j.last(); len(rec.Active) != 0 {
		t.Errorf("write intent after the quiesce: %v active extents, want none", rec.Active)
	}
	second := make(chan error, 1)
	go func() { second <- r.e.WriteAt(ctx, pattern(2, 4096), 8192) }()
	select {
	case err := <-second:
		t.Fatalf("a write went through a quiesced volume: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	resume()
	resume() // a second resume is harmless
	if err := <-second; err != nil {
		t.Fatal(err)
	}

	// A quiesce that cannot get its cut in time gives up.
	r.kids[1].setInject(func(op Op, _, _ int64) error {
		if op == OpWrite {
			time.Sleep(100 * time.Millisecond)
		}
		return nil
	})
	go r.e.WriteAt(ctx, pattern(3, 4096), 0)
	time.Sleep(10 * time.Millisecond)
	tctx, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
	defer cancel()
	if _, err := r.e.Quiesce(tctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("quiesce past its deadline: %v, want DeadlineExceeded", err)
	}
}
