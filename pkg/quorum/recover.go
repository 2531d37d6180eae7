package quorum

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
)

// RecoverStats says what Recover did.
type RecoverStats struct {
	Extents  int   `json:"extents"`
	Compared int64 `json:"comparedBytes"`
	Repaired int64 `json:"repairedBytes"`
}

// recoverChunk is the unit of comparison during recovery.
const recoverChunk = 1 << 20

// recoverWorkers chunks are compared at a time, and the copies of each
// are read at once: a takeover after a crash serves nothing until
// recovery ends, and the replicas' disks and network answer a queue of
// requests much faster than one at a time.
const recoverWorkers = 4

// Recover makes the healthy children identical in the extents of a
// record that was active when the last user of the volume stopped without
// Shutdown (a crash). Only there can they differ: every write ran inside
// a committed extent. The first healthy child that answers is the
// source: a write acknowledged before the crash is on every healthy
// child, so any of them holds it, and a write that was not acknowledged
// may land either way. Children that are not in sync get the extents
// added to their dirty maps, since their maps may lag there. Call it
// before any I/O.
func (e *Engine) Recover(ctx context.Context, active []int64) (RecoverStats, error) {
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

	type chunk struct{ off, n int64 }
	chunks := make(chan chunk)
	var (
		mu     sync.Mutex // guards st and err
		st     = RecoverStats{Extents: len(active)}
		err    error
		failed atomic.Bool
		wg     sync.WaitGroup
	)
	for range recoverWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			bufs := make([][]byte, len(e.children))
			for i := range bufs {
				bufs[i] = getBuf(recoverChunk)
			}
			defer func() {
				for _, b := range bufs {
					putBuf(b)
				}
			}()
			for c := range chunks {
				if failed.Load() {
					continue
				}
				var cs RecoverStats
				cerr := e.reconcile(ctx, bufs, c.off, c.n, &cs)
				mu.Lock()
				st.Compared += cs.Compared
				st.Repaired += cs.Repaired
				if cerr != nil && err == nil {
					err = cerr
					failed.Store(true)
				}
				mu.Unlock()
			}
		}()
	}
	for _, x := range active {
		end := min((x+1)*extent, e.size)
		for off := x * extent; off < end && !failed.Load(); off += recoverChunk {
			chunks <- chunk{off, min(recoverChunk, end-off)}
		}
	}
	close(chunks)
	wg.Wait()
	if err != nil {
		return st, err
	}
	e.faultMu.Lock()
	defer e.faultMu.Unlock()
	if err := e.commitRecord(ctx, []int64{}); err != nil {
		return st, fmt.Errorf("recover: %w", err)
	}
	return st, nil
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
// request is in flight.
func (e *Engine) Shutdown(ctx context.Context) error {
	if err := e.Flush(ctx); err != nil {
		return err
	}
	e.intent.mu.Lock()
	clear(e.intent.active)
	e.intent.mu.Unlock()
	e.faultMu.Lock()
	defer e.faultMu.Unlock()
	return e.commitRecord(ctx, []int64{})
}

// Quiesce makes a consistent cut of the volume while it stays open: it
// holds new requests, waits for those in flight, flushes every child and
// commits a write intent with no extent active, so that every in-sync
// child holds every acknowledged write and a copy of it needs no crash
// recovery. Requests wait until resume is called (once); a ctx that ends
// first gives up and lets them through.
func (e *Engine) Quiesce(ctx context.Context) (resume func(), err error) {
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
