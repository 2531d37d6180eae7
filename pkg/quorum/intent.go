package quorum

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
)

// Journal persists what the engine must know after a crash or at the
// next attach: which extents may hold writes that not every child has
// (the write intent, in the spirit of DRBD's activity log), and which
// regions each out-of-sync child misses. Commits are serialised.
type Journal interface {
	Commit(ctx context.Context, rec Record) error
}

// CommitError is what Journal.Commit returns when the record reached
// some of the children it goes to but not all: Failed maps each child
// (by index) that did not store it to why. When at least VoteThreshold
// children stored it, the engine faults the others (they resync when
// they answer again) and commits once more; otherwise the commit fails.
type CommitError struct {
	Failed map[int]error
}

func (c *CommitError) Error() string {
	errs := make([]error, 0, len(c.Failed))
	for _, i := range slices.Sorted(maps.Keys(c.Failed)) {
		errs = append(errs, c.Failed[i])
	}
	return fmt.Sprintf("journal record not stored by %d children: %v", len(c.Failed), errors.Join(errs...))
}

// Record is one state of the journal.
type Record struct {
	// Active lists, ascending, the extents (offset / ExtentSize) where
	// writes may be in flight or not yet flushed. After a crash, children
	// may differ there and nowhere else.
	Active []int64
	// Dirty maps each child that is not in sync (by index) to the regions
	// it misses. Inside Active extents a map may lag behind; those
	// extents count as dirty for every such child after a crash.
	Dirty map[int]*Bitmap
}

// Defaults for the write-intent record: 1024 extents of 4 MiB keep up to
// 4 GiB of recently written space hot (DRBD's default activity log is
// 4.8 GiB), so a random-write working set of that size costs no journal
// commit once warm, and a crash costs at most a comparison of 4 GiB.
const (
	DefaultExtentSize    = 4 << 20
	DefaultActiveExtents = 1024
)

// intentLog is the in-memory side of the write intent.
type intentLog struct {
	mu       sync.Mutex
	active   map[int64]*extentUse
	pending  map[int64]bool
	tick     uint64
	leader   bool          // a commit is under way
	done     chan struct{} // closed when the commit under way ends
	lastErr  error         // result of the last commit, for its waiters
	evicting []int64       // extents the commit under way drops
	capacity int
	shift    uint
}

type extentUse struct {
	inflight int
	lastUse  uint64
}

func (l *intentLog) extents(off, length int64) (first, last int64) {
	return off >> l.shift, (off + max(length, 1) - 1) >> l.shift
}

// beginWrite makes [off, off+length) part of the committed write intent
// and counts the write in flight there. Concurrent misses share one
// commit.
func (e *Engine) beginWrite(ctx context.Context, off, length int64) error {
	l := &e.intent
	first, last := l.extents(off, length)
	l.mu.Lock()
	for {
		missing := false
		for x := first; x <= last; x++ {
			if l.active[x] == nil {
				missing = true
				l.pending[x] = true
			}
		}
		if !missing {
			l.tick++
			for x := first; x <= last; x++ {
				u := l.active[x]
				u.inflight++
				u.lastUse = l.tick
			}
			l.mu.Unlock()
			return nil
		}
		if !l.leader {
			err := e.commitLocked(ctx)
			if err != nil {
				l.mu.Unlock()
				return err
			}
			continue
		}
		done := l.done
		l.mu.Unlock()
		select {
		case <-done:
		case <-ctx.Done():
			return ctx.Err()
		}
		l.mu.Lock()
		if l.lastErr != nil {
			err := l.lastErr
			l.mu.Unlock()
			return err
		}
	}
}

// endWrite counts a write out of its extents.
func (e *Engine) endWrite(off, length int64) {
	l := &e.intent
	first, last := l.extents(off, length)
	l.mu.Lock()
	for x := first; x <= last; x++ {
		l.active[x].inflight--
	}
	l.mu.Unlock()
}

// commitLocked, called with l.mu held and no commit under way, persists
// the active extents plus everything pending, evicting idle extents
// beyond capacity. Evicted extents leave the map before the I/O so that
// a new write to one becomes a miss and waits for the next commit; their
// data is flushed on every child before the record that drops them.
func (e *Engine) commitLocked(ctx context.Context) error {
	l := &e.intent
	l.leader = true
	l.done = make(chan struct{})
	added := make([]int64, 0, len(l.pending))
	for x := range l.pending {
		added = append(added, x)
	}
	clear(l.pending)
	var victims []int64
	if over := len(l.active) + len(added) - l.capacity; over > 0 {
		// Evict an eighth of the log at once: each eviction costs a flush.
		victims = l.idle(over + l.capacity/8)
		for _, x := range victims {
			delete(l.active, x)
		}
	}
	l.evicting = victims
	active := make([]int64, 0, len(l.active)+len(added))
	for x := range l.active {
		active = append(active, x)
	}
	active = append(active, added...)
	slices.Sort(active)
	l.mu.Unlock()

	err := e.commitIntent(ctx, active, len(victims) > 0)

	l.mu.Lock()
	if err == nil {
		for _, x := range added {
			if l.active[x] == nil {
				l.active[x] = &extentUse{}
			}
		}
	} else {
		// The victims are gone from the map either way: an extent that
		// may not be in the last good record only becomes active again
		// through a commit.
		err = fmt.Errorf("commit write intent: %w", err)
	}
	l.lastErr = err
	l.evicting = nil
	l.leader = false
	close(l.done)
	return err
}

// idle picks up to n extents with no write in flight, least recently
// used first.
func (l *intentLog) idle(n int) []int64 {
	var cand []int64
	for x, u := range l.active {
		if u.inflight == 0 {
			cand = append(cand, x)
		}
	}
	slices.SortFunc(cand, func(a, b int64) int {
		return int(l.active[a].lastUse) - int(l.active[b].lastUse)
	})
	return cand[:min(n, len(cand))]
}

// commitIntent writes a record with the given active extents, first
// flushing every child when extents leave the record.
func (e *Engine) commitIntent(ctx context.Context, active []int64, flush bool) error {
	if flush {
		if err := e.Flush(ctx); err != nil {
			return err
		}
	}
	e.faultMu.Lock()
	defer e.faultMu.Unlock()
	return e.commitRecord(ctx, active)
}

// commitRecord persists active with the current dirty maps. The caller
// holds faultMu, so that the record holds every fault so far and a
// child that cannot store it can be faulted here; commits are
// serialised by journalMu, so records reach the journal in order.
func (e *Engine) commitRecord(ctx context.Context, active []int64) error {
	if e.cfg.Journal == nil {
		return nil
	}
	e.journalMu.Lock()
	defer e.journalMu.Unlock()
	if e.fenced.Load() {
		return fmt.Errorf("commit journal record: %w", ErrFenced)
	}
	if active == nil {
		active = e.lastActive
	}
	for {
		rec := Record{Active: active, Dirty: map[int]*Bitmap{}}
		e.dirtyMu.Lock()
		for i, m := range e.children {
			if m.dirty != nil {
				rec.Dirty[i] = m.dirty.Clone()
			}
		}
		e.dirtyMu.Unlock()
		err := e.cfg.Journal.Commit(ctx, rec)
		var ce *CommitError
		if err == nil {
			break
		}
		if !errors.As(err, &ce) {
			return err
		}
		for _, cause := range ce.Failed {
			if errors.Is(cause, ErrFenced) {
				e.fenced.Store(true)
				return fmt.Errorf("commit journal record: %w", cause)
			}
		}
		if len(e.children)-len(rec.Dirty)-len(ce.Failed) < e.cfg.VoteThreshold {
			return err
		}
		for i, cause := range ce.Failed {
			if _, ok := rec.Dirty[i]; ok {
				return fmt.Errorf("journal reports child %d, which the record leaves out: %w", i, err)
			}
			e.faultLocked(i, OpJournal, 0, 0, cause)
		}
	}
	e.lastActive = active
	// The record holds every faulty child's dirty map: none is
	// unrecorded any more.
	for _, m := range e.children {
		if m.unrecorded {
			m.unrecorded = false
			e.unrecorded.Add(-1)
		}
	}
	return nil
}

// unflushed marks in b every extent whose writes may not have been
// flushed: the active ones and those being evicted (flushed only once
// the commit under way has succeeded).
func (l *intentLog) unflushed(b *Bitmap, size int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	mark := func(x int64) {
		off := x << l.shift
		b.SetRange(off, min(int64(1)<<l.shift, size-off))
	}
	for x := range l.active {
		mark(x)
	}
	for _, x := range l.evicting {
		mark(x)
	}
}
