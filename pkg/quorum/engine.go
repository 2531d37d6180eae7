package quorum

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// ErrQuorumFailure is wrapped by every error from a request that could not
// reach the vote threshold. Block frontends turn it into EIO.
var ErrQuorumFailure = errors.New("quorum failure")

// ErrOutOfRange is wrapped by errors for requests beyond the volume's end.
var ErrOutOfRange = errors.New("request out of range")

// ChildState is the engine's view of a child's health.
type ChildState string

const (
	ChildHealthy ChildState = "healthy"
	// ChildFaulty children failed a modifying request and are left out of
	// all I/O from then on.
	ChildFaulty ChildState = "faulty"
)

// ChildStatus describes one child for status output.
type ChildStatus struct {
	Name  string     `json:"name"`
	State ChildState `json:"state"`
	Error string     `json:"error,omitempty"`
}

type member struct {
	Member
	faulty atomic.Bool
	// Guarded by Engine.faultMu.
	cause      error
	unrecorded bool
}

// Engine is a replicated volume over N children. Its methods are safe for
// concurrent use.
type Engine struct {
	cfg      Config
	children []*member
	size     int64
	ranges   rangeTable
	faultMu  sync.Mutex
	// unrecorded counts faulty children whose OnFaulty has not succeeded.
	unrecorded atomic.Int32
}

// New validates cfg and returns an engine over its children.
func New(cfg Config) (*Engine, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("quorum config: %w", err)
	}
	e := &Engine{cfg: cfg, size: cfg.Children[0].Child.Size()}
	for _, m := range cfg.Children {
		e.children = append(e.children, &member{Member: m})
	}
	return e, nil
}

// Size is the volume size in bytes.
func (e *Engine) Size() int64 { return e.size }

// VoteThreshold is the effective threshold (after defaulting).
func (e *Engine) VoteThreshold() int { return e.cfg.VoteThreshold }

// ReadPattern is the effective read pattern (after defaulting).
func (e *Engine) ReadPattern() ReadPattern { return e.cfg.ReadPattern }

// Status lists the children in configured order.
func (e *Engine) Status() []ChildStatus {
	e.faultMu.Lock()
	defer e.faultMu.Unlock()
	out := make([]ChildStatus, len(e.children))
	for i, m := range e.children {
		out[i] = ChildStatus{Name: m.Name, State: ChildHealthy}
		if m.faulty.Load() {
			out[i].State = ChildFaulty
			out[i].Error = m.cause.Error()
		}
	}
	return out
}

// Faulty reports whether child i has been left out.
func (e *Engine) Faulty(i int) bool { return e.children[i].faulty.Load() }

func (e *Engine) healthy() []int {
	idx := make([]int, 0, len(e.children))
	for i, m := range e.children {
		if !m.faulty.Load() {
			idx = append(idx, i)
		}
	}
	return idx
}

func (e *Engine) emit(ev Event) {
	if e.cfg.OnEvent != nil {
		e.cfg.OnEvent(ev)
	}
}

func (e *Engine) checkRange(op Op, off, length int64) error {
	if off < 0 || length < 0 || off > e.size || length > e.size-off {
		return fmt.Errorf("%s at %d length %d on a %d-byte volume: %w", op, off, length, e.size, ErrOutOfRange)
	}
	return nil
}

// quorumFailure emits QUORUM_FAILURE and builds the request's error.
func (e *Engine) quorumFailure(op Op, off, length int64, reason string) error {
	e.emit(Event{Type: EventQuorumFailure, Op: op, Offset: off, Length: length, Error: reason})
	return fmt.Errorf("%s at %d length %d: %s: %w", op, off, length, reason, ErrQuorumFailure)
}

// fault reports child i bad and, on its first failure of a modifying
// request, makes it faulty; awaitRecords then records that.
func (e *Engine) fault(i int, op Op, off, length int64, cause error) {
	m := e.children[i]
	e.emit(Event{Type: EventReportBad, Op: op, Offset: off, Length: length, Child: m.Name, Error: cause.Error()})
	e.faultMu.Lock()
	defer e.faultMu.Unlock()
	if !m.faulty.Load() {
		m.cause = cause
		m.unrecorded = true
		// Counted before the child is left out, so that any request that
		// skipped it sees the count and waits for the record.
		e.unrecorded.Add(1)
		m.faulty.Store(true)
	}
}

// recordLocked runs OnFaulty for every faulty child not yet recorded.
// A failure leaves the child unrecorded, and every modifying request
// fails until a later attempt succeeds: a write that a replica missed
// must not be acknowledged before that is known.
func (e *Engine) recordLocked(ctx context.Context) error {
	for i, m := range e.children {
		if !m.unrecorded {
			continue
		}
		if e.cfg.OnFaulty != nil {
			if err := e.cfg.OnFaulty(ctx, i, m.cause); err != nil {
				return fmt.Errorf("record child %s as faulty: %w", m.Name, err)
			}
		}
		m.unrecorded = false
		e.unrecorded.Add(-1)
	}
	return nil
}

// awaitRecords makes a request that skipped a faulty child wait until that
// child's state is recorded.
func (e *Engine) awaitRecords(ctx context.Context) error {
	if e.unrecorded.Load() == 0 {
		return nil
	}
	e.faultMu.Lock()
	defer e.faultMu.Unlock()
	return e.recordLocked(ctx)
}

// fanout runs fn(0..n-1) concurrently, fn(0) on the calling goroutine,
// and returns the errors by position.
func fanout(n int, fn func(k int) error) []error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for k := 1; k < n; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[k] = fn(k)
		}()
	}
	errs[0] = fn(0)
	wg.Wait()
	return errs
}

// modify runs a modifying request on every healthy child under an
// exclusive range, applying the write rule.
func (e *Engine) modify(ctx context.Context, op Op, off, length int64, fn func(c Child) error) error {
	if err := e.checkRange(op, off, length); err != nil {
		return err
	}
	r, err := e.ranges.acquire(ctx, off, off+length, true)
	if err != nil {
		return fmt.Errorf("%s at %d length %d: %w", op, off, length, err)
	}
	defer e.ranges.release(r)
	return e.modifyLocked(ctx, op, off, length, e.healthy(), fn)
}

func (e *Engine) modifyLocked(ctx context.Context, op Op, off, length int64, idx []int, fn func(c Child) error) error {
	t := e.cfg.VoteThreshold
	if len(idx) < t {
		return e.quorumFailure(op, off, length, fmt.Sprintf("%d healthy children, threshold %d", len(idx), t))
	}
	errs := fanout(len(idx), func(k int) error { return fn(e.children[idx[k]].Child) })
	ok := 0
	for k, err := range errs {
		if err == nil {
			ok++
			continue
		}
		e.fault(idx[k], op, off, length, err)
	}
	recErr := e.awaitRecords(ctx)
	if ok < t {
		return e.quorumFailure(op, off, length, fmt.Sprintf("%d of %d children succeeded, threshold %d", ok, len(idx), t))
	}
	if recErr != nil {
		return e.quorumFailure(op, off, length, recErr.Error())
	}
	return nil
}

// WriteAt writes p at off on every healthy child.
func (e *Engine) WriteAt(ctx context.Context, p []byte, off int64) error {
	return e.modify(ctx, OpWrite, off, int64(len(p)), func(c Child) error { return c.WriteAt(ctx, p, off) })
}

// WriteZeroes zeroes a range on every healthy child, keeping it allocated.
func (e *Engine) WriteZeroes(ctx context.Context, off, length int64) error {
	return e.modify(ctx, OpWriteZeroes, off, length, func(c Child) error { return c.WriteZeroes(ctx, off, length) })
}

// Discard deallocates a range on every healthy child; it reads as zeroes.
func (e *Engine) Discard(ctx context.Context, off, length int64) error {
	return e.modify(ctx, OpDiscard, off, length, func(c Child) error { return c.Discard(ctx, off, length) })
}

// Flush makes every completed write durable on at least t children.
func (e *Engine) Flush(ctx context.Context) error {
	return e.modifyLocked(ctx, OpFlush, 0, 0, e.healthy(), func(c Child) error { return c.Flush(ctx) })
}

// ReadAt fills p from off according to the read pattern.
func (e *Engine) ReadAt(ctx context.Context, p []byte, off int64) error {
	length := int64(len(p))
	if err := e.checkRange(OpRead, off, length); err != nil {
		return err
	}
	r, err := e.ranges.acquire(ctx, off, off+length, false)
	if err != nil {
		return fmt.Errorf("read at %d length %d: %w", off, length, err)
	}
	defer e.ranges.release(r)
	if e.cfg.ReadPattern == ReadPatternFIFO {
		return e.readFIFO(ctx, p, off)
	}
	return e.readVote(ctx, p, off)
}

func (e *Engine) readFIFO(ctx context.Context, p []byte, off int64) error {
	length := int64(len(p))
	tried := 0
	for _, i := range e.healthy() {
		m := e.children[i]
		err := m.Child.ReadAt(ctx, p, off)
		if err == nil {
			return nil
		}
		tried++
		e.emit(Event{Type: EventReportBad, Op: OpRead, Offset: off, Length: length, Child: m.Name, Error: err.Error()})
		if ctx.Err() != nil {
			return fmt.Errorf("read at %d length %d: %w", off, length, ctx.Err())
		}
	}
	return e.quorumFailure(OpRead, off, length, fmt.Sprintf("all %d healthy children failed", tried))
}

func (e *Engine) readVote(ctx context.Context, p []byte, off int64) error {
	length := int64(len(p))
	t := e.cfg.VoteThreshold
	idx := e.healthy()
	if len(idx) < t {
		return e.quorumFailure(OpRead, off, length, fmt.Sprintf("%d healthy children, threshold %d", len(idx), t))
	}
	// The first child reads straight into p; the others into pooled buffers.
	bufs := make([][]byte, len(idx))
	bufs[0] = p
	for k := 1; k < len(idx); k++ {
		bufs[k] = getBuf(len(p))
	}
	defer func() {
		for _, b := range bufs[1:] {
			putBuf(b)
		}
	}()
	errs := fanout(len(idx), func(k int) error { return e.children[idx[k]].Child.ReadAt(ctx, bufs[k], off) })
	replies := make([][]byte, len(idx))
	ok := 0
	for k, err := range errs {
		if err != nil {
			e.emit(Event{Type: EventReportBad, Op: OpRead, Offset: off, Length: length, Child: e.children[idx[k]].Name, Error: err.Error()})
			continue
		}
		replies[k] = bufs[k]
		ok++
	}
	if e.cfg.Strict && ok < len(idx) {
		return e.quorumFailure(OpRead, off, length, fmt.Sprintf("strict mode: %d of %d children failed to read", len(idx)-ok, len(idx)))
	}
	if ok < t {
		return e.quorumFailure(OpRead, off, length, fmt.Sprintf("%d of %d children read successfully, threshold %d", ok, len(idx), t))
	}
	versions := tally(replies)
	if len(versions) > 1 && e.cfg.Strict {
		e.reportLosers(versions, 0, idx, off, length, "strict mode: content differs from "+e.children[idx[versions[0].members[0]]].Name)
		return e.quorumFailure(OpRead, off, length, fmt.Sprintf("strict mode: children returned %d different versions", len(versions)))
	}
	w := winner(versions)
	if n := len(versions[w].members); n < t {
		return e.quorumFailure(OpRead, off, length, fmt.Sprintf("best version has %d of %d votes, threshold %d", n, len(idx), t))
	}
	win := versions[w].members[0]
	if win != 0 {
		copy(p, bufs[win])
	}
	if len(versions) == 1 {
		return nil
	}
	e.reportLosers(versions, w, idx, off, length, "content lost the vote")
	if e.cfg.RewriteCorrupted {
		var losers []int
		for j, v := range versions {
			if j != w {
				for _, k := range v.members {
					losers = append(losers, idx[k])
				}
			}
		}
		e.rewrite(ctx, losers, p, off)
	}
	return nil
}

// rewrite repairs losers with the winning bytes. The read holds a shared
// range, which excludes every write; a concurrent reader can only rewrite
// the same winning bytes. A loser that cannot be rewritten becomes faulty;
// the read itself has the right data and succeeds.
func (e *Engine) rewrite(ctx context.Context, losers []int, p []byte, off int64) {
	errs := fanout(len(losers), func(k int) error { return e.children[losers[k]].Child.WriteAt(ctx, p, off) })
	for k, err := range errs {
		if err != nil {
			e.fault(losers[k], OpWrite, off, int64(len(p)), fmt.Errorf("rewrite corrupted: %w", err))
		}
	}
	// A record failure cannot make the served data wrong; the next
	// modifying request retries it and fails while it fails.
	_ = e.awaitRecords(ctx)
}

func (e *Engine) reportLosers(versions []version, w int, idx []int, off, length int64, why string) {
	for j, v := range versions {
		if j == w {
			continue
		}
		for _, k := range v.members {
			e.emit(Event{Type: EventReportBad, Op: OpRead, Offset: off, Length: length, Child: e.children[idx[k]].Name, Error: why})
		}
	}
}
