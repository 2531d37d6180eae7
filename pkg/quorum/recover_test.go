package quorum

import (
	"bytes"
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

// TestRecoverOnDemand: crash recovery returns at once; a request to an
// extent recovers that extent first (and sees the source's bytes), a
// request to an extent still being recovered waits for it, a Shutdown
// meanwhile keeps the extents left in the record, and the background
// recovery ends with the children identical.
func TestRecoverOnDemand(t *testing.T) {
	const extent = 64 << 10
	j := &fakeJournal{}
	r := newRig(t, 3, 4*extent, Config{Journal: j, ExtentSize: extent, RegionSize: 4096, ActiveExtents: 8})
	defer r.e.Close()
	ctx := context.Background()
	for i, b := range []byte{1, 2, 1} {
		copy(r.kids[i].data[extent:], pattern(b, 2*extent)) // extents 1 and 2
	}
	// Extent 2 cannot be read until released: its recovery hangs.
	release, started := make(chan struct{}), make(chan struct{})
	var once sync.Once
	for _, k := range r.kids {
		k.setInject(func(op Op, off, _ int64) error {
			if op == OpRead && off >= 2*extent && off < 3*extent {
				once.Do(func() { close(started) })
				<-release
			}
			return nil
		})
	}
	r.e.Recover([]int64{1, 2})
	<-started

	got := make([]byte, extent)
	if err := r.e.ReadAt(ctx, got, extent); err != nil || !bytes.Equal(got, pattern(1, extent)) {
		t.Fatalf("read of extent 1 during recovery: %v, first byte %d, want the source's 1", err, got[0])
	}
	wrote := make(chan error, 1)
	go func() { wrote <- r.e.WriteAt(ctx, pattern(9, 4096), 2*extent) }()
	select {
	case err := <-wrote:
		t.Fatalf("write to an extent under recovery did not wait: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	if err := r.e.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if rec, _ := j.last(); !slices.Equal(rec.Active, []int64{2}) {
		t.Errorf("record after a shutdown during recovery: active %v, want [2] left to the next attach", rec.Active)
	}

	close(release)
	if err := <-wrote; err != nil {
		t.Fatalf("write after recovery: %v", err)
	}
	st, err := r.e.Recovered(ctx)
	if err != nil || st.Extents != 2 || st.Repaired != 2*extent {
		t.Errorf("recovered %+v, %v: want 2 extents and child 1's two repaired", st, err)
	}
	r.assertIdentical(t)
	if d := r.kids[1].snapshot(); d[extent] != 1 || d[2*extent] != 9 || d[2*extent+4096] != 1 {
		t.Errorf("child 1 after recovery: %d %d %d, want the source's bytes and the write", d[extent], d[2*extent], d[2*extent+4096])
	}
}
