package quorum

import (
	"context"
	"errors"
	"fmt"
)

// ScrubStats adds up what Scrub found.
type ScrubStats struct {
	Scanned int64 `json:"scannedBytes"`
	// Mismatched counts chunk-children that lost a vote and were repaired.
	Repaired int64 `json:"repairedChunks"`
	// Unresolved counts chunks where no version reached the threshold;
	// they are reported (QUORUM_FAILURE) and left as they are.
	Unresolved int64 `json:"unresolvedChunks"`
}

// Scrub votes across the healthy children over [off, off+len(buf)),
// whatever the read pattern, reports children that disagree with the
// winner (REPORT_BAD) and rewrites them with it: how fifo volumes find
// and repair silent corruption. buf is scratch space of the chunk size.
func (e *Engine) Scrub(ctx context.Context, buf []byte, off int64, st *ScrubStats) error {
	length := int64(len(buf))
	if err := e.checkRange(OpRead, off, length); err != nil {
		return err
	}
	if !e.active.Load() {
		return fmt.Errorf("scrub at %d: %w", off, ErrStandby)
	}
	if e.fenced.Load() {
		return fmt.Errorf("scrub at %d: %w", off, ErrFenced)
	}
	if err := e.recoverRange(ctx, off, length); err != nil {
		return fmt.Errorf("scrub at %d: %w", off, err)
	}
	r, err := e.ranges.acquire(ctx, off, off+length, false)
	if err != nil {
		return fmt.Errorf("scrub at %d: %w", off, err)
	}
	defer e.ranges.release(r)
	losers, err := e.readVote(ctx, buf, off, voteMode{rewrite: true})
	st.Scanned += length
	st.Repaired += int64(losers)
	if errors.Is(err, ErrQuorumFailure) && !errors.Is(err, ErrFenced) && ctx.Err() == nil {
		st.Unresolved++
		return nil
	}
	return err
}
