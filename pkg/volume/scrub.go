package volume

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/alignbuf"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// scrubChunk is the unit of a scrub: large enough for sequential reads,
// small enough that the shared range it holds delays writes little.
const scrubChunk = 1 << 20

// ScrubProgress is the state of the scrub pass under way or last done.
type ScrubProgress struct {
	Pass  int64 `json:"pass"`
	Done  int64 `json:"doneBytes"`
	Total int64 `json:"totalBytes"`
	quorum.ScrubStats
}

type scrubState struct {
	pass, done, repaired, unresolved atomic.Int64
}

// ScrubProgress reports the current or last pass.
func (v *Volume) ScrubProgress() ScrubProgress {
	s := &v.scrub
	return ScrubProgress{Pass: s.pass.Load(), Done: s.done.Load(), Total: v.Size(),
		ScrubStats: quorum.ScrubStats{Scanned: s.done.Load(), Repaired: s.repaired.Load(), Unresolved: s.unresolved.Load()}}
}

// Scrub makes one pass over the volume at up to rate bytes per second
// (0: as fast as it goes), repairing minorities as it goes.
func (v *Volume) Scrub(ctx context.Context, rate int64) (quorum.ScrubStats, error) {
	var st quorum.ScrubStats
	s := &v.scrub
	s.pass.Add(1)
	s.done.Store(0)
	s.repaired.Store(0)
	s.unresolved.Store(0)
	buf := alignbuf.Make(scrubChunk, 0)
	start := time.Now()
	size := v.Size()
	for off := int64(0); off < size; off += scrubChunk {
		n := min(scrubChunk, size-off)
		if err := v.Engine.Scrub(ctx, buf[:n], off, &st); err != nil {
			return st, err
		}
		s.done.Store(st.Scanned)
		s.repaired.Store(st.Repaired)
		s.unresolved.Store(st.Unresolved)
		if rate > 0 {
			// Sleep until the pass is back at its rate.
			ahead := time.Duration(float64(st.Scanned)/float64(rate)*float64(time.Second)) - time.Since(start)
			if ahead > 0 {
				select {
				case <-ctx.Done():
					return st, ctx.Err()
				case <-time.After(ahead):
				}
			}
		}
	}
	return st, nil
}

// ProbeEvery asks the faulty replicas every interval whether they answer
// again (which starts their resync), until ctx ends.
func (v *Volume) ProbeEvery(ctx context.Context, interval time.Duration) {
	every(ctx, interval, func() { v.Probe(ctx) })
}

// every calls fn every interval until ctx ends.
func every(ctx context.Context, interval time.Duration, fn func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}

// ScrubEvery scrubs at rate, a pass at once and then one every interval,
// until ctx ends or another attach fences this one (its replicas are
// that attach's to scrub). Other errors end a pass, not the schedule;
// they were reported as events.
func (v *Volume) ScrubEvery(ctx context.Context, rate int64, interval time.Duration) {
	for {
		if _, err := v.Scrub(ctx, rate); errors.Is(err, quorum.ErrFenced) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}
