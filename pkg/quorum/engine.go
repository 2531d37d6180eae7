package quorum

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"
)

// ErrQuorumFailure is wrapped by every error from a request that could not
// reach the vote threshold. Block frontends turn it into EIO.
var ErrQuorumFailure = errors.New("quorum failure")

// ErrOutOfRange is wrapped by errors for requests beyond the volume's end.
var ErrOutOfRange = errors.New("request out of range")

// ChildState is the engine's view of a child.
type ChildState string

const (
	ChildHealthy ChildState = "healthy"
	// ChildFaulty children failed a modifying request, or started stale;
	// they get no I/O, and every region written meanwhile is marked dirty
	// for them.
	ChildFaulty ChildState = "faulty"
	// ChildResyncing children answer again and get their dirty regions
	// copied from healthy children; they take writes but serve no reads
	// and count for no threshold until they are in sync.
	ChildResyncing ChildState = "resyncing"
)

const (
	stateHealthy int32 = iota
	stateFaulty
	stateResyncing
)

var stateNames = [...]ChildState{ChildHealthy, ChildFaulty, ChildResyncing}

// ChildStatus describes one child for status output.
type ChildStatus struct {
	Name  string     `json:"name"`
	State ChildState `json:"state"`
	Error string     `json:"error,omitempty"`
	// DirtyBytes is what the child misses: regions written while it was
	// faulty and not yet copied to it.
	DirtyBytes int64 `json:"dirtyBytes"`
	// ResyncDone and ResyncTotal are the bytes copied to the child and
	// to copy in the current resync.
	ResyncDone  int64 `json:"resyncDone,omitempty"`
	ResyncTotal int64 `json:"resyncTotal,omitempty"`
}

type member struct {
	Member
	state atomic.Int32
	// Guarded by Engine.faultMu.
	cause      error
	unrecorded bool
	// dirty marks the regions the child misses; nil while healthy.
	// Guarded by Engine.dirtyMu.
	dirty       *Bitmap
	resyncDone  atomic.Int64
	resyncTotal atomic.Int64
	// resyncRunning is set while a resync goroutine of the child has not
	// returned: one that faulted may still be finishing a copy, and a
	// second one beside it would see the first clear the dirty map.
	// Guarded by Engine.resyncMu.
	resyncRunning bool
}

// Engine is a replicated volume over N children. Its methods are safe for
// concurrent use.
type Engine struct {
	cfg      Config
	children []*member
	size     int64
	ranges   rangeTable
	faultMu  sync.Mutex
	// unrecorded counts faulty children not yet in a committed record.
	unrecorded atomic.Int32
	dirtyMu    sync.Mutex

	intent     intentLog
	recovery   recovery
	journalMu  sync.Mutex
	lastActive []int64 // extents in the last committed record

	// Background resyncs run under bg and are waited for by Close.
	bg       context.Context
	stopBg   context.CancelFunc
	bgWG     sync.WaitGroup
	resyncMu sync.Mutex // serialises starting resyncs

	// active is false while the engine is a standby (Config.Standby):
	// then nothing but reads reaches the children.
	active atomic.Bool
	gate   standbyGate
	// fenced is set once a child answered ErrFenced, for good.
	fenced atomic.Bool
}

// New validates cfg and returns an engine over its children. Children
// given with a Dirty bitmap start faulty; Probe or StartResync brings
// them back.
func New(cfg Config) (*Engine, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("quorum config: %w", err)
	}
	e := &Engine{cfg: cfg, size: cfg.Children[0].Child.Size()}
	e.intent = intentLog{
		active:   map[int64]*extentUse{},
		pending:  map[int64]bool{},
		capacity: cfg.ActiveExtents,
		shift:    uint(bits.TrailingZeros64(uint64(cfg.ExtentSize))),
	}
	e.bg, e.stopBg = context.WithCancel(context.Background())
	e.gate.activated = make(chan struct{})
	if cfg.Standby == nil {
		e.active.Store(true)
		close(e.gate.activated)
	}
	for _, m := range cfg.Children {
		mem := &member{Member: m}
		if m.Dirty != nil {
			mem.dirty = m.Dirty.Clone()
			mem.state.Store(stateFaulty)
			mem.cause = errors.New("stale at attach")
		}
		e.children = append(e.children, mem)
	}
	return e, nil
}

// Close stops background resyncs and waits for them. It does not flush.
func (e *Engine) Close() {
	e.stopBg()
	e.bgWG.Wait()
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
	e.dirtyMu.Lock()
	defer e.dirtyMu.Unlock()
	out := make([]ChildStatus, len(e.children))
	for i, m := range e.children {
		st := m.state.Load()
		out[i] = ChildStatus{Name: m.Name, State: stateNames[st]}
		if m.dirty != nil {
			out[i].DirtyBytes = m.dirty.Bytes()
		}
		if st != stateHealthy && m.cause != nil {
			out[i].Error = m.cause.Error()
		}
		if st == stateResyncing {
			out[i].ResyncDone, out[i].ResyncTotal = m.resyncDone.Load(), m.resyncTotal.Load()
		}
	}
	return out
}

// Faulty reports whether child i is left out of reads (faulty or still
// resyncing).
func (e *Engine) Faulty(i int) bool { return e.children[i].state.Load() != stateHealthy }

// Dirty returns a copy of the regions child i misses, or nil when it is
// healthy.
func (e *Engine) Dirty(i int) *Bitmap {
	e.dirtyMu.Lock()
	defer e.dirtyMu.Unlock()
	if d := e.children[i].dirty; d != nil {
		return d.Clone()
	}
	return nil
}

// healthy lists the children that serve reads.
func (e *Engine) healthy() []int {
	idx := make([]int, 0, len(e.children))
	for i, m := range e.children {
		if m.state.Load() == stateHealthy {
			idx = append(idx, i)
		}
	}
	return idx
}

// writeTargets lists the children a modifying request goes to (healthy
// ones first, then resyncing ones) and how many of them are healthy. The
// range is marked dirty for every faulty child before the request runs.
func (e *Engine) writeTargets(off, length int64) (idx []int, healthy int) {
	idx = make([]int, 0, len(e.children))
	var faulty bool
	for i, m := range e.children {
		switch m.state.Load() {
		case stateHealthy:
			idx = append(idx, i)
		case stateFaulty:
			faulty = true
		}
	}
	healthy = len(idx)
	for i, m := range e.children {
		if m.state.Load() == stateResyncing {
			idx = append(idx, i)
		}
	}
	if faulty && length > 0 {
		e.dirtyMu.Lock()
		for _, m := range e.children {
			if m.state.Load() == stateFaulty {
				m.dirty.SetRange(off, length)
			}
		}
		e.dirtyMu.Unlock()
	}
	return idx, healthy
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

// fault reports child i bad and makes it faulty. The range it missed is
// marked dirty for it. A failed flush may have lost any write not flushed
// before: with a journal, that is the extents of the write intent; without
// one, everything. awaitRecords then commits the fault.
func (e *Engine) fault(i int, op Op, off, length int64, cause error) {
	e.faultMu.Lock()
	defer e.faultMu.Unlock()
	e.faultLocked(i, op, off, length, cause)
}

func (e *Engine) faultLocked(i int, op Op, off, length int64, cause error) {
	if errors.Is(cause, ErrFenced) {
		e.fenced.Store(true)
		return
	}
	m := e.children[i]
	e.emit(Event{Type: EventReportBad, Op: op, Offset: off, Length: length, Child: m.Name, Error: cause.Error()})
	e.dirtyMu.Lock()
	if m.dirty == nil {
		m.dirty = NewBitmap(e.size, e.cfg.RegionSize)
	}
	if op == OpFlush && e.cfg.Journal != nil {
		e.intent.unflushed(m.dirty, e.size)
	} else if op == OpFlush {
		m.dirty.SetRange(0, e.size)
	} else {
		m.dirty.SetRange(off, length)
	}
	e.dirtyMu.Unlock()
	if m.state.Load() == stateFaulty {
		return
	}
	m.cause = cause
	if !m.unrecorded {
		m.unrecorded = true
		// Counted before the child is left out, so that any request that
		// skipped it sees the count and waits for the record.
		e.unrecorded.Add(1)
	}
	m.state.Store(stateFaulty)
}

// recordLocked commits the journal when a faulty child is not yet in
// it. A failure leaves the children unrecorded, and every modifying
// request fails until a later attempt succeeds.
func (e *Engine) recordLocked(ctx context.Context) error {
	if e.unrecorded.Load() == 0 {
		return nil
	}
	if err := e.commitRecord(ctx, nil); err != nil {
		return fmt.Errorf("record faulty children: %w", err)
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

// modify runs a modifying request on every healthy and resyncing child
// under an exclusive range, applying the write rule to the healthy ones.
func (e *Engine) modify(ctx context.Context, op Op, off, length int64, fn func(c Child) error) error {
	if err := e.checkRange(op, off, length); err != nil {
		return err
	}
	if err := e.recoverRange(ctx, off, length); err != nil {
		return fmt.Errorf("%s at %d length %d: %w", op, off, length, err)
	}
	r, err := e.ranges.acquire(ctx, off, off+length, true)
	if err != nil {
		return fmt.Errorf("%s at %d length %d: %w", op, off, length, err)
	}
	defer e.ranges.release(r)
	if e.cfg.Journal != nil {
		if err := e.beginWrite(ctx, off, length); errors.Is(err, ErrFenced) {
			return e.fencedFailure(op, off, length)
		} else if err != nil {
			return e.quorumFailure(op, off, length, err.Error())
		}
		defer e.endWrite(off, length)
	}
	idx, healthy := e.writeTargets(off, length)
	return e.modifyLocked(ctx, op, off, length, idx, healthy, fn)
}

// modifyLocked sends the request to idx, whose first healthy entries
// count for the threshold.
func (e *Engine) modifyLocked(ctx context.Context, op Op, off, length int64, idx []int, healthy int, fn func(c Child) error) error {
	t := e.cfg.VoteThreshold
	if e.fenced.Load() {
		return e.fencedFailure(op, off, length)
	}
	if healthy < t {
		return e.quorumFailure(op, off, length, fmt.Sprintf("%d healthy children, threshold %d", healthy, t))
	}
	errs := fanout(len(idx), func(k int) error { return fn(e.children[idx[k]].Child) })
	ok := 0
	for k, err := range errs {
		if err != nil {
			e.fault(idx[k], op, off, length, err)
		} else if k < healthy {
			ok++
		}
	}
	if e.fenced.Load() {
		return e.fencedFailure(op, off, length)
	}
	recErr := e.awaitRecords(ctx)
	if errors.Is(recErr, ErrFenced) {
		return e.fencedFailure(op, off, length)
	}
	if ok < t {
		return e.quorumFailure(op, off, length, fmt.Sprintf("%d of %d healthy children succeeded, threshold %d", ok, healthy, t))
	}
	if recErr != nil {
		return e.quorumFailure(op, off, length, recErr.Error())
	}
	return nil
}

// WriteAt writes p at off on every healthy child.
func (e *Engine) WriteAt(ctx context.Context, p []byte, off int64) error {
	if err := e.awaitActive(ctx, OpWrite); err != nil {
		return err
	}
	return e.modify(ctx, OpWrite, off, int64(len(p)), func(c Child) error { return c.WriteAt(ctx, p, off) })
}

// WriteZeroes zeroes a range on every healthy child, keeping it allocated.
func (e *Engine) WriteZeroes(ctx context.Context, off, length int64) error {
	if err := e.awaitActive(ctx, OpWriteZeroes); err != nil {
		return err
	}
	return e.modify(ctx, OpWriteZeroes, off, length, func(c Child) error { return c.WriteZeroes(ctx, off, length) })
}

// Discard deallocates a range on every healthy child; it reads as zeroes.
func (e *Engine) Discard(ctx context.Context, off, length int64) error {
	if err := e.awaitActive(ctx, OpDiscard); err != nil {
		return err
	}
	return e.modify(ctx, OpDiscard, off, length, func(c Child) error { return c.Discard(ctx, off, length) })
}

// Flush makes every completed write durable on at least t children.
//
// A standby's flush succeeds without activating it: no write has
// completed through it, so there is nothing to make durable, and the
// kernel flushes a device for reasons of its own. The kubelet puts a
// loop device over every Block volume's device, and setting one up
// flushes the device below; were that an activation, staging a live
// migration's target would fence the running source at once.
func (e *Engine) Flush(ctx context.Context) error {
	if !e.active.Load() {
		return nil
	}
	idx, healthy := e.writeTargets(0, 0)
	return e.modifyLocked(ctx, OpFlush, 0, 0, idx, healthy, func(c Child) error { return c.Flush(ctx) })
}

// ReadAt fills p from off according to the read pattern.
func (e *Engine) ReadAt(ctx context.Context, p []byte, off int64) error {
	length := int64(len(p))
	if err := e.checkRange(OpRead, off, length); err != nil {
		return err
	}
	defer e.holdStandby()()
	if err := e.recoverRange(ctx, off, length); err != nil {
		return fmt.Errorf("read at %d length %d: %w", off, length, err)
	}
	r, err := e.ranges.acquire(ctx, off, off+length, false)
	if err != nil {
		return fmt.Errorf("read at %d length %d: %w", off, length, err)
	}
	defer e.ranges.release(r)
	if e.cfg.ReadPattern == ReadPatternFIFO {
		return e.readFIFO(ctx, p, off)
	}
	// A standby rewrites nothing: a write would take a child over.
	_, err = e.readVote(ctx, p, off, voteMode{rewrite: e.cfg.RewriteCorrupted && e.active.Load(), strict: e.cfg.Strict})
	return err
}

// voteMode says what a voting read does about disagreement.
type voteMode struct {
	rewrite bool // rewrite losers with the winner
	strict  bool // fail on any disagreement
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
		if errors.Is(err, ErrFenced) {
			e.fenced.Store(true)
			return e.fencedFailure(OpRead, off, length)
		}
		if ctx.Err() != nil {
			// Given up (a scrub stopped at a detach, a caller gone): no
			// child is to blame.
			return fmt.Errorf("read at %d length %d: %w", off, length, ctx.Err())
		}
		tried++
		e.emit(Event{Type: EventReportBad, Op: OpRead, Offset: off, Length: length, Child: m.Name, Error: err.Error()})
	}
	return e.quorumFailure(OpRead, off, length, fmt.Sprintf("all %d healthy children failed", tried))
}

// readVote reads every healthy child, votes, and returns how many
// children lost the vote.
func (e *Engine) readVote(ctx context.Context, p []byte, off int64, mode voteMode) (int, error) {
	length := int64(len(p))
	t := e.cfg.VoteThreshold
	idx := e.healthy()
	if len(idx) < t {
		return 0, e.quorumFailure(OpRead, off, length, fmt.Sprintf("%d healthy children, threshold %d", len(idx), t))
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
	if err := ctx.Err(); err != nil {
		// Given up (a scrub stopped at a detach, a caller gone): no
		// child is to blame and no vote failed.
		return 0, fmt.Errorf("read at %d length %d: %w", off, length, err)
	}
	replies := make([][]byte, len(idx))
	ok := 0
	fenced := false
	for k, err := range errs {
		if errors.Is(err, ErrFenced) {
			fenced = true
		} else if err != nil {
			e.emit(Event{Type: EventReportBad, Op: OpRead, Offset: off, Length: length, Child: e.children[idx[k]].Name, Error: err.Error()})
		} else {
			replies[k] = bufs[k]
			ok++
		}
	}
	if fenced {
		e.fenced.Store(true)
		return 0, e.fencedFailure(OpRead, off, length)
	}
	if mode.strict && ok < len(idx) {
		return 0, e.quorumFailure(OpRead, off, length, fmt.Sprintf("strict mode: %d of %d children failed to read", len(idx)-ok, len(idx)))
	}
	if ok < t {
		return 0, e.quorumFailure(OpRead, off, length, fmt.Sprintf("%d of %d children read successfully, threshold %d", ok, len(idx), t))
	}
	versions := tally(replies)
	if len(versions) > 1 && mode.strict {
		e.reportLosers(versions, 0, idx, off, length, "strict mode: content differs from "+e.children[idx[versions[0].members[0]]].Name)
		return 0, e.quorumFailure(OpRead, off, length, fmt.Sprintf("strict mode: children returned %d different versions", len(versions)))
	}
	w := winner(versions)
	if n := len(versions[w].members); n < t {
		return 0, e.quorumFailure(OpRead, off, length, fmt.Sprintf("best version has %d of %d votes, threshold %d", n, len(idx), t))
	}
	win := versions[w].members[0]
	if win != 0 {
		copy(p, bufs[win])
	}
	if len(versions) == 1 {
		return 0, nil
	}
	e.reportLosers(versions, w, idx, off, length, "content lost the vote")
	var losers []int
	for j, v := range versions {
		if j != w {
			for _, k := range v.members {
				losers = append(losers, idx[k])
			}
		}
	}
	if mode.rewrite {
		e.rewrite(ctx, losers, p, off)
	}
	return len(losers), nil
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
