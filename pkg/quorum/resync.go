package quorum

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
)

// probeSize is what Probe reads to see whether a faulty child answers.
const probeSize = 4096

// Probe asks every faulty child whether it answers again (a small read)
// and starts a resync for each one that does. The caller decides how
// often; the engine keeps no clock.
func (e *Engine) Probe(ctx context.Context) {
	if !e.active.Load() {
		return
	}
	buf := make([]byte, min(probeSize, e.size))
	for i, m := range e.children {
		if m.state.Load() != stateFaulty {
			continue
		}
		if err := m.Child.ReadAt(ctx, buf, 0); err != nil {
			continue
		}
		e.StartResync(i)
	}
}

// StartResync moves faulty child i to resyncing and copies its dirty
// regions to it in the background, while the volume stays in use.
// It does nothing unless the child is faulty, the engine active and the
// child's last resync has returned.
func (e *Engine) StartResync(i int) {
	e.resyncMu.Lock()
	defer e.resyncMu.Unlock()
	m := e.children[i]
	if e.bg.Err() != nil || !e.active.Load() || m.resyncRunning || !m.state.CompareAndSwap(stateFaulty, stateResyncing) {
		return
	}
	m.resyncRunning = true
	e.dirtyMu.Lock()
	m.resyncDone.Store(0)
	m.resyncTotal.Store(m.dirty.Bytes())
	e.dirtyMu.Unlock()
	e.bgWG.Add(1)
	go func() {
		defer e.bgWG.Done()
		err := e.resync(e.bg, i)
		// Its copies are done: the next resync may start.
		e.resyncMu.Lock()
		m.resyncRunning = false
		e.resyncMu.Unlock()
		if err != nil && e.bg.Err() == nil {
			e.fault(i, OpWrite, 0, 0, fmt.Errorf("resync: %w", err))
			// The record is retried by the next modifying request if it
			// fails here.
			_ = e.awaitRecords(e.bg)
		}
	}()
}

// errNoSource: no healthy child could provide a region.
var errNoSource = errors.New("no healthy child could be read")

// Resync copies in runs of up to resyncRun bytes of contiguous dirty
// regions, resyncWorkers at a time: a full copy then streams instead of
// going one small region at a time.
const (
	resyncRun     = 1 << 20
	resyncWorkers = 8
)

// resync copies child i's dirty regions, each run under an exclusive
// range so that no write to it runs meanwhile. A write that reaches the
// child while a region is still dirty changes nothing: the region is
// copied whole afterwards. When no region is left, the child is flushed,
// the journal records it in sync, and it serves reads again.
func (e *Engine) resync(ctx context.Context, i int) error {
	m := e.children[i]
	for {
		if m.state.Load() != stateResyncing {
			return nil // it failed a write meanwhile; fault has the cause
		}
		if err := e.resyncPass(ctx, i); err != nil {
			return err
		}
		if m.state.Load() != stateResyncing {
			return nil
		}
		if done, err := e.finishResync(ctx, i); done || err != nil {
			return err
		}
	}
}

// resyncPass copies every region dirty when it reaches it, once.
func (e *Engine) resyncPass(ctx context.Context, i int) error {
	m := e.children[i]
	var mu sync.Mutex
	var cursor int64
	var firstErr error
	regionsPerRun := max(1, resyncRun/e.cfg.RegionSize)
	// next claims the next run of contiguous dirty regions at or after
	// the cursor.
	next := func() (first, n int64) {
		mu.Lock()
		defer mu.Unlock()
		if firstErr != nil {
			return -1, 0
		}
		e.dirtyMu.Lock()
		defer e.dirtyMu.Unlock()
		first = m.dirty.Next(cursor)
		if first < 0 {
			return -1, 0
		}
		n = 1
		for n < regionsPerRun && first+n < m.dirty.Regions() && m.dirty.Test(first+n) {
			n++
		}
		cursor = first + n
		return first, n
	}
	var wg sync.WaitGroup
	for range resyncWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := getBuf(int(regionsPerRun * e.cfg.RegionSize))
			defer putBuf(buf)
			for {
				first, n := next()
				if first < 0 || m.state.Load() != stateResyncing {
					return
				}
				off, _ := m.dirty.Span(first)
				lastOff, lastLen := m.dirty.Span(first + n - 1)
				length := lastOff + lastLen - off
				err := e.copyRegion(ctx, i, buf[:length], off)
				if err != nil {
					mu.Lock()
					firstErr = cmp.Or(firstErr, err)
					mu.Unlock()
					return
				}
				e.dirtyMu.Lock()
				for r := first; r < first+n; r++ {
					m.dirty.Clear(r)
				}
				e.dirtyMu.Unlock()
				m.resyncDone.Add(length)
			}
		}()
	}
	wg.Wait()
	return firstErr
}

func (e *Engine) copyRegion(ctx context.Context, i int, buf []byte, off int64) error {
	// The healthy children agree here only once crash recovery has been.
	if err := e.recoverRange(ctx, off, int64(len(buf))); err != nil {
		return err
	}
	rr, err := e.ranges.acquire(ctx, off, off+int64(len(buf)), true)
	if err != nil {
		return err
	}
	defer e.ranges.release(rr)
	read := false
	for _, src := range e.healthy() {
		if err := e.children[src].Child.ReadAt(ctx, buf, off); err != nil {
			e.emit(Event{Type: EventReportBad, Op: OpRead, Offset: off, Length: int64(len(buf)), Child: e.children[src].Name, Error: err.Error()})
			continue
		}
		read = true
		break
	}
	if !read {
		return fmt.Errorf("region at %d: %w", off, errNoSource)
	}
	// Zeroes are discarded rather than written: a replacement stays as
	// sparse as the replicas it copies.
	if allZero(buf) {
		if err := e.children[i].Child.Discard(ctx, off, int64(len(buf))); err != nil {
			return fmt.Errorf("discard region at %d: %w", off, err)
		}
		return nil
	}
	if err := e.children[i].Child.WriteAt(ctx, buf, off); err != nil {
		return fmt.Errorf("write region at %d: %w", off, err)
	}
	return nil
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.NativeEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// finishResync makes the child healthy once it holds every region, and
// reports whether it did. The last check and the switch happen with all
// requests excluded, so none can slip in between.
func (e *Engine) finishResync(ctx context.Context, i int) (bool, error) {
	m := e.children[i]
	if err := m.Child.Flush(ctx); err != nil {
		return false, fmt.Errorf("flush: %w", err)
	}
	rr, err := e.ranges.acquire(ctx, 0, e.size, true)
	if err != nil {
		return false, err
	}
	defer e.ranges.release(rr)
	e.faultMu.Lock()
	defer e.faultMu.Unlock()
	if m.state.Load() != stateResyncing {
		return true, nil // it failed meanwhile: fault has the cause
	}
	e.dirtyMu.Lock()
	dirty := m.dirty
	if dirty.Next(0) >= 0 {
		e.dirtyMu.Unlock()
		return false, nil
	}
	m.dirty = nil
	e.dirtyMu.Unlock()
	// The journal learns that the child is in sync before it serves reads.
	if err := e.commitRecord(ctx, nil); err != nil {
		e.dirtyMu.Lock()
		m.dirty = dirty
		e.dirtyMu.Unlock()
		return false, fmt.Errorf("record in sync: %w", err)
	}
	if m.state.Load() != stateResyncing {
		return true, nil // it could not store the record: faulted again
	}
	m.cause = nil
	m.state.Store(stateHealthy)
	return true, nil
}
