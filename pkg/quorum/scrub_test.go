package quorum

import (
	"context"
	"slices"
	"testing"
)

// TestScrub: a fifo volume, whose reads never compare children, finds
// silent corruption by scrubbing, reports it and repairs the minority;
// where no version has a majority it reports and leaves the data alone.
func TestScrub(t *testing.T) {
	r := newRig(t, 3, 64<<10, Config{ReadPattern: ReadPatternFIFO})
	r.fill(0, pattern(1, 64<<10))
	copy(r.kids[2].data[4096:], pattern(9, 512)) // c2 silently corrupt
	copy(r.kids[0].data[40960:], pattern(7, 512))
	copy(r.kids[1].data[40960:], pattern(8, 512)) // three versions
	ctx := context.Background()
	var st ScrubStats
	buf := make([]byte, 8192)
	for off := int64(0); off < 64<<10; off += 8192 {
		if err := r.e.Scrub(ctx, buf, off, &st); err != nil {
			t.Fatal(err)
		}
	}
	if st.Scanned != 64<<10 || st.Repaired != 1 || st.Unresolved != 1 {
		t.Fatalf("stats %+v, want 64 KiB scanned, 1 repaired, 1 unresolved", st)
	}
	if got := r.events.summary(); !slices.Contains(got, "REPORT_BAD:c2") || !slices.Contains(got, "QUORUM_FAILURE") {
		t.Errorf("events %v", got)
	}
	if r.kids[2].data[4096] != 1 {
		t.Error("minority not repaired")
	}
	if r.kids[0].data[40960] != 7 || r.kids[1].data[40960] != 8 {
		t.Error("a chunk without a majority was changed")
	}
}
