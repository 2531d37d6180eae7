package quorum

import (
	"bytes"
	"context"
	"fmt"
	"sync"
)

// RecoverStats says what Recover did.
type RecoverStats struct {
	Extents  int   `json:"extents"`
	Compared int64 `json:"comparedBytes"`
	Repaired int64 `json:"repairedBytes"`
}

// recoverChunk is the unit of comparison during recovery.
const recoverChunk = 1 << 20

// Recover makes the healthy children identical in the extents of a
// record that was active when the last user of the volume stopped without
// Shutdown (a crash). Only there can they differ: every write ran inside
// a committed extent. The first healthy child in order is the source: a
// write acknowledged before the crash is on every healthy child, so any
// of them holds it, and a write that was not acknowledged may land either
// way. Children that are not in sync get the extents added to their dirty
// maps, since their maps may lag there. Call it before any I/O.
func (e *Engine) Recover(ctx context.Context, active []int64) (RecoverStats, error) {
	var st RecoverStats
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
	src := getBuf(recoverChunk)
	other := getBuf(recoverChunk)
	defer putBuf(src)
	defer putBuf(other)
	for _, x := range active {
		st.Extents++
		end := min((x+1)*extent, e.size)
		for off := x * extent; off < end; off += recoverChunk {
			n := min(recoverChunk, end-off)
			if err := e.reconcile(ctx, src[:n], other[:n], off, &st); err != nil {
				return st, err
			}
		}
	}
	e.faultMu.Lock()
	defer e.faultMu.Unlock()
	if err := e.commitRecord(ctx, []int64{}); err != nil {
		return st, fmt.Errorf("recover: %w", err)
	}
	return st, nil
}

// reconcile copies the first healthy child's bytes at off to every
// healthy child that differs.
func (e *Engine) reconcile(ctx context.Context, src, other []byte, off int64, st *RecoverStats) error {
	n := int64(len(src))
	idx := e.healthy()
	k := 0
	for ; k < len(idx); k++ {
		if err := e.children[idx[k]].Child.ReadAt(ctx, src, off); err == nil {
			break
		} else {
			e.fault(idx[k], OpRead, off, n, fmt.Errorf("recover: %w", err))
		}
	}
	if k == len(idx) {
		return e.quorumFailure(OpRead, off, n, "recover: no healthy child could be read")
	}
	st.Compared += n
	for _, i := range idx[k+1:] {
		c := e.children[i].Child
		if err := c.ReadAt(ctx, other, off); err != nil {
			e.fault(i, OpRead, off, n, fmt.Errorf("recover: %w", err))
			continue
		}
		st.Compared += n
		if bytes.Equal(src, other) {
			continue
		}
		if err := c.WriteAt(ctx, src, off); err != nil {
			e.fault(i, OpWrite, off, n, fmt.Errorf("recover: %w", err))
			continue
		}
		st.Repaired += n
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
	return e.commitRecord(ctx, []int64{})
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
