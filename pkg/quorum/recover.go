package quorum

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
)

// RecoverStats says what crash recovery did.
type RecoverStats struct {
	Extents  int   `json:"extents"`
	Compared int64 `json:"comparedBytes"`
	Repaired int64 `json:"repairedBytes"`
}

// recoverChunk is the unit of comparison during recovery.
const recoverChunk = 1 << 20

// recoverWorkers extents are recovered at a time in the background, and
// the copies of each chunk are read at once: the replicas' disks and
// network answer a queue of requests much faster than one at a time.
const recoverWorkers = 4

// recovery is the crash recovery under way: the extents the children
// may still differ in.
type recovery struct {
	// n counts the extents left, read without mu by every request.
	n  atomic.Int64
	mu sync.Mutex
	// left maps each extent left to nil, or while it is being recovered
	// to a channel closed when that attempt ends.
	left map[int64]chan struct{}
	st   RecoverStats
	err  error         // the background recovery's failure
	done chan struct{} // closed when the background recovery ends
}

// Recover starts crash recovery: it makes the healthy children identical
// in the extents of a record that was active when the last user of the
// volume stopped without Shutdown (a crash). Only there can they differ:
// every write ran inside a committed extent. The first healthy child
// that answers is the source: a write acknowledged before the crash is on
// every healthy child, so any of them holds it, and a write that was not
// acknowledged may land either way. Children that are not in sync get
// the extents added to their dirty maps, since their maps may lag there.
//
// Call it once, before any I/O. It returns at once: an extent is
// recovered when a request first touches it (the request waits for
// that extent alone), and the rest in the background, so a volume taken
// over after a crash serves again without first comparing up to the
// whole write intent (4 GiB by default). The extents stay in the write
// intent until they are recovered, through any commit or Shutdown, so
// a crash during recovery leaves them to the next attach. Recovered
// waits for the end.
func (e *Engine) Recover(active []int64) {
	e.journalMu.Lock()
	e.lastActive = active
	e.journalMu.Unlock()
	extent := e.cfg.ExtentSize
	e.dirtyMu.Lock()
	for _, m := range e.children {
		if m.dirty != nil {
			for _, x := range active {
				m.dirty.SetRange(x*extent, min(extent, e.size-x*extent))
			}
		}
	}
	e.dirtyMu.Unlock()

	r := &e.recovery
	r.left = make(map[int64]chan struct{}, len(active))
	r.st.Extents = len(active)
	r.done = make(chan struct{})
	l := &e.intent
	l.mu.Lock()
	for _, x := range active {
		r.left[x] = nil
		// Pinned, as if a write were in flight there, until recovered:
		// an extent evicted from the intent would leave the record.
		l.active[x] = &extentUse{inflight: 1}
	}
	l.mu.Unlock()
	r.n.Store(int64(len(active)))

	todo := make(chan int64, len(active))
	for _, x := range active {
		todo <- x
	}
	close(todo)
	var wg sync.WaitGroup
	for range min(recoverWorkers, len(active)) {
		wg.Add(1)
		e.bgWG.Add(1)
		go func() {
			defer e.bgWG.Done()
			defer wg.Done()
			for x := range todo {
				if err := e.recoverExtent(e.bg, x); err != nil {
					r.mu.Lock()
					r.err = cmp.Or(r.err, err)
					r.mu.Unlock()
					return
				}
			}
		}()
	}
	e.bgWG.Add(1)
	go func() {
		defer e.bgWG.Done()
		wg.Wait()
		close(r.done)
	}()
}

// Recovered waits until the crash recovery Recover started has ended
// and says what it did; without Recover it returns at once. An error is
// the reason the background recovery stopped (a quorum failure, or
// Close); the extents left are recovered by the requests that touch
// them, or by the next attach.
func (e *Engine) Recovered(ctx context.Context) (RecoverStats, error) {
	r := &e.recovery
	if r.done != nil {
		select {
		case <-r.done:
		case <-ctx.Done():
			return RecoverStats{}, fmt.Errorf("wait for crash recovery: %w", ctx.Err())
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.st, r.err
}

// recoverRange recovers the extents of [off, off+length) that are left,
// before a request touches them. It costs one atomic load once recovery
// is over.
func (e *Engine) recoverRange(ctx context.Context, off, length int64) error {
	if e.recovery.n.Load() == 0 {
		return nil
	}
	first, last := e.intent.extents(off, length)
	for x := first; x <= last; x++ {
		if err := e.recoverExtent(ctx, x); err != nil {
			return err
		}
	}
	return nil
}

// recoverExtent recovers extent x if it is left, or waits while another
// goroutine does.
func (e *Engine) recoverExtent(ctx context.Context, x int64) error {
	r := &e.recovery
	for {
		r.mu.Lock()
		ch, left := r.left[x]
		if !left {
			r.mu.Unlock()
			return nil
		}
		if ch != nil {
			r.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		ch = make(chan struct{})
		r.left[x] = ch
		r.mu.Unlock()

		var st RecoverStats
		err := e.reconcileExtent(ctx, x, &st)
		r.mu.Lock()
		r.st.Compared += st.Compared
		r.st.Repaired += st.Repaired
		if err == nil {
			delete(r.left, x)
			r.n.Add(-1)
		} else {
			r.left[x] = nil
		}
		close(ch)
		r.mu.Unlock()
		if err != nil {
			return err
		}
		l := &e.intent
		l.mu.Lock()
		if u := l.active[x]; u != nil {
			u.inflight--
		}
		l.mu.Unlock()
		return nil
	}
}

// leftToRecover lists, ascending, the extents crash recovery has not
// made identical yet.
func (e *Engine) leftToRecover() []int64 {
	r := &e.recovery
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Sorted(maps.Keys(r.left))
}

// reconcileExtent makes the healthy children identical in extent x, with
// no request in it meanwhile.
func (e *Engine) reconcileExtent(ctx context.Context, x int64, st *RecoverStats) error {
	extent := e.cfg.ExtentSize
	off, end := x*extent, min((x+1)*extent, e.size)
	rr, err := e.ranges.acquire(ctx, off, end, true)
	if err != nil {
		return err
	}
	defer e.ranges.release(rr)
	bufs := make([][]byte, len(e.children))
	for i := range bufs {
		bufs[i] = getBuf(recoverChunk)
	}
	defer func() {
		for _, b := range bufs {
			putBuf(b)
		}
	}()
	for ; off < end; off += recoverChunk {
		if err := e.reconcile(ctx, bufs, off, min(recoverChunk, end-off), st); err != nil {
			return err
		}
	}
	return nil
}

// reconcile reads n bytes at off from every healthy child at once (into
// bufs, by child) and copies the first that answered to every one that
// differs.
func (e *Engine) reconcile(ctx context.Context, bufs [][]byte, off, n int64, st *RecoverStats) error {
	idx := e.healthy()
	if len(idx) == 0 {
		return e.quorumFailure(OpRead, off, n, "recover: no healthy child")
	}
	errs := fanout(len(idx), func(k int) error {
		return e.children[idx[k]].Child.ReadAt(ctx, bufs[idx[k]][:n], off)
	})
	if err := ctx.Err(); err != nil {
		// Given up (Close, or the request that waited for it): no
		// child is to blame.
		return fmt.Errorf("recover at %d: %w", off, err)
	}
	src := -1
	for k, i := range idx {
		if errs[k] != nil {
			e.fault(i, OpRead, off, n, fmt.Errorf("recover: %w", errs[k]))
			continue
		}
		st.Compared += n
		if src < 0 {
			src = i
			continue
		}
		if bytes.Equal(bufs[src][:n], bufs[i][:n]) {
			continue
		}
		if err := e.children[i].Child.WriteAt(ctx, bufs[src][:n], off); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("recover at %d: %w", off, ctx.Err())
			}
			e.fault(i, OpWrite, off, n, fmt.Errorf("recover: %w", err))
			continue
		}
		st.Repaired += n
	}
	if src < 0 {
		return e.quorumFailure(OpRead, off, n, "recover: no healthy child could be read")
	}
	if err := e.awaitRecords(ctx); err != nil {
		return err
	}
	if len(e.healthy()) < e.cfg.VoteThreshold {
		return e.quorumFailure(OpWrite, off, n, "recover: fewer healthy children than the threshold")
	}
	return nil
}

// Shutdown flushes the volume and commits a record with no active
// extent, so that the next attach needs no recovery. Call it when no
// request is in flight. A standby wrote nothing and leaves the children
// to their holder: nothing to do.
func (e *Engine) Shutdown(ctx context.Context) error {
	if !e.active.Load() {
		return nil
	}
	if err := e.Flush(ctx); err != nil {
		return err
	}
	e.intent.mu.Lock()
	clear(e.intent.active)
	e.intent.mu.Unlock()
	e.faultMu.Lock()
	defer e.faultMu.Unlock()
	// Extents crash recovery has not reached stay in the record: the
	// next attach recovers them. (Not nil, which commitRecord would take
	// for the last record's extents.)
	return e.commitRecord(ctx, append([]int64{}, e.leftToRecover()...))
}

// Quiesce makes a consistent cut of the volume while it stays open: it
// holds new requests, waits for those in flight, flushes every child and
// commits a write intent with no extent active, so that every in-sync
// child holds every acknowledged write and a copy of it needs no crash
// recovery. Requests wait until resume is called (once); a ctx that ends
// first gives up and lets them through.
func (e *Engine) Quiesce(ctx context.Context) (resume func(), err error) {
	if !e.active.Load() {
		return nil, fmt.Errorf("quiesce: %w: the active attachment holds the writes to cut", ErrStandby)
	}
	// A cut holds no extent that the children may differ in.
	if err := e.recoverRange(ctx, 0, e.size); err != nil {
		return nil, fmt.Errorf("quiesce: finish crash recovery: %w", err)
	}
	rr, err := e.ranges.acquire(ctx, 0, e.size, true)
	if err != nil {
		return nil, fmt.Errorf("quiesce: %w", err)
	}
	var once sync.Once
	resume = func() { once.Do(func() { e.ranges.release(rr) }) }
	if err := e.Shutdown(ctx); err != nil {
		resume()
		return nil, fmt.Errorf("quiesce: %w", err)
	}
	return resume, nil
}
