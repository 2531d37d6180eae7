package volume

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

func block(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }

func readBlock(t *testing.T, v *Volume, off int64) byte {
	t.Helper()
	p := make([]byte, 4096)
	if err := v.ReadAt(context.Background(), p, off); err != nil {
		t.Fatalf("read at %d: %v", off, err)
	}
	if !bytes.Equal(p, block(p[0])) {
		t.Fatalf("read at %d: mixed content", off)
	}
	return p[0]
}

// TestStandbyOpen: a standby opened with a newer epoch while the source
// writes takes nothing over: the source keeps writing, the standby
// reads its data, and neither the replicas' epoch nor their metadata
// change. Its first write fences the source; the replica the source had
// left out of sync is not read and is resynced; the replicas end
// identical with the source's data before the activation and the
// standby's after it.
func TestStandbyOpen(t *testing.T) {
	ps, srv, uris := servedReplicas(t)
	ctx := context.Background()
	var bad *failingChild
	src, err := Open(ctx, uris, small(Options{Epoch: 1, wrapChild: func(i int, c quorum.Child) quorum.Child {
		if i == 2 {
			bad = &failingChild{Child: c}
			return bad
		}
		return c
	}}))
	if err != nil {
		t.Fatal(err)
	}
	defer src.closeFiles()
	if err := src.WriteAt(ctx, block(1), 0); err != nil {
		t.Fatal(err)
	}
	metaBefore := meta(t, ps[0])

	tgt, err := Open(ctx, uris, small(Options{Epoch: 2, Standby: true}))
	if err != nil {
		t.Fatalf("standby open: %v", err)
	}
	defer tgt.closeFiles()
	if err := src.WriteAt(ctx, block(3), 8192); err != nil {
		t.Fatalf("source write with a standby attached: %v", err)
	}
	// The source leaves c out: c misses 16384, which the journal says.
	bad.armed = true
	if err := src.WriteAt(ctx, block(4), 16384); err != nil {
		t.Fatalf("source write without c: %v", err)
	}
	for off, want := range map[int64]byte{0: 1, 8192: 3} {
		if got := readBlock(t, tgt, off); got != want {
			t.Errorf("standby read at %d: %d, want the source's %d", off, got, want)
		}
	}
	for i := range uris {
		if e, _ := srv.srv.Epoch(filepath.Base(ps[i])); e != 1 {
			t.Errorf("replica %d: epoch %d with a standby attached, want the source's 1", i, e)
		}
	}
	if m := meta(t, ps[0]); m != metaBefore {
		t.Errorf("standby changed the metadata: %+v, was %+v", m, metaBefore)
	}
	if !tgt.Standby() {
		t.Fatal("reads activated the standby")
	}

	if err := tgt.WriteAt(ctx, block(2), 8192); err != nil {
		t.Fatalf("standby's first write: %v", err)
	}
	if err := src.WriteAt(ctx, block(9), 12288); !errors.Is(err, quorum.ErrFenced) {
		t.Fatalf("source write after the activation: %v, want fenced", err)
	}
	assertFenced(t, src, 2) // c was out already
	if st, err := tgt.Recovered(ctx); err != nil || !slices.Equal(tgt.Stale, []string{uris[2]}) || st.Extents == 0 {
		t.Errorf("activation: stale %v (want %s), recovered %+v, %v", tgt.Stale, uris[2], st, err)
	}
	if got := readBlock(t, tgt, 16384); got != 4 {
		t.Errorf("read of what c missed: %d, want 4", got)
	}
	b := detachAll(t, tgt, srv, ps)
	for off, want := range map[int]byte{0: 1, 8192: 2, 12288: 0, 16384: 4} {
		if b[off] != want {
			t.Errorf("replicas at %d hold %d, want %d", off, b[off], want)
		}
	}
}

// TestStandbyDetachWritesNothing: a standby detached without a write
// (a cancelled migration) leaves the replicas to the source, which goes
// on writing and detaches cleanly.
func TestStandbyDetachWritesNothing(t *testing.T) {
	ps, srv, src, tgt := migration(t)
	ctx := context.Background()
	before := meta(t, ps[1])
	if err := tgt.Close(ctx); err != nil {
		t.Fatalf("close of a standby: %v", err)
	}
	if m := meta(t, ps[1]); m != before {
		t.Errorf("closing the standby changed the metadata: %+v, was %+v", m, before)
	}
	if err := src.WriteAt(ctx, block(5), 0); err != nil {
		t.Fatalf("source write after the standby left: %v", err)
	}
	if err := src.Close(ctx); err != nil {
		t.Fatal(err)
	}
	srv.stop()
	assertSame(t, ps)
}

// migration is three replicas behind one server, a source attach with
// epoch 1 and a standby with epoch 2.
func migration(t *testing.T) (ps []string, srv *replicaServer, src, tgt *Volume) {
	t.Helper()
	ps, srv, uris := servedReplicas(t)
	var err error
	if src, err = Open(context.Background(), uris, small(Options{Epoch: 1})); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.closeFiles() })
	if tgt, err = Open(context.Background(), uris, small(Options{Epoch: 2, Standby: true})); err != nil {
		t.Fatal(err)
	}
	return ps, srv, src, tgt
}

// detachAll closes the holder v once its replicas are in sync, stops
// their server, expects them identical and returns their content.
func detachAll(t *testing.T, v *Volume, srv *replicaServer, ps []string) []byte {
	t.Helper()
	waitInSync(t, v)
	if err := v.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	srv.stop()
	assertSame(t, ps)
	b, err := os.ReadFile(ps[0])
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// assertFenced expects a write of v to fail as fenced, and v to have
// left its replicas' state as it was: a fence is no replica's fault.
func assertFenced(t *testing.T, v *Volume, healthy int) {
	t.Helper()
	err := v.WriteAt(context.Background(), block(9), 1<<20)
	if !errors.Is(err, quorum.ErrFenced) || !errors.Is(err, quorum.ErrQuorumFailure) || !v.Fenced() {
		t.Fatalf("write of the fenced source: %v, want fenced", err)
	}
	n := 0
	for _, st := range v.Status() {
		if st.State == quorum.ChildHealthy {
			n++
		}
	}
	if n != healthy {
		t.Errorf("fenced source: %d healthy replicas, want %d: %+v", n, healthy, v.Status())
	}
}

// TestStandbyLocalReplicaRefused: only replica servers can fence.
func TestStandbyLocalReplicaRefused(t *testing.T) {
	ps := newReplicas(t, t.TempDir(), 4<<20, "a")
	_, err := Open(context.Background(), ps, Options{Standby: true})
	if err == nil || !strings.Contains(err.Error(), "cannot fence") {
		t.Fatalf("standby on a local image: %v", err)
	}
}

// TestStandbyRace: the standby starts writing while the source's
// writers are busy, each to its own blocks. Exactly one holds the
// replicas afterwards (the standby: its epoch is newer), every write
// acknowledged to either is on every replica, and the source's writes
// fail from the fence on.
func TestStandbyRace(t *testing.T) {
	ps, srv, src, tgt := migration(t)
	ctx := context.Background()
	const writers, perWriter = 4, 64
	acked := map[string]*[writers * perWriter]atomic.Bool{"source": {}, "standby": {}}
	var srcAcks atomic.Int32
	standbyGo := make(chan struct{})
	var wg sync.WaitGroup
	for who, v := range map[string]*Volume{"source": src, "standby": tgt} {
		base := int64(0)
		if who == "standby" {
			base = 2 << 20
		}
		for w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if who == "standby" {
					<-standbyGo
				}
				for k := range perWriter {
					n := w*perWriter + k
					if err := v.WriteAt(ctx, block(byte(n%250+1)), base+int64(n)*4096); err != nil {
						if who == "standby" {
							t.Errorf("standby write %d: %v", n, err)
						}
						// A fenced writer stays fenced.
						return
					}
					acked[who][n].Store(true)
					if who == "source" && srcAcks.Add(1) == 16 {
						close(standbyGo)
					}
				}
			}()
		}
	}
	wg.Wait()
	count := func(who string) (n int) {
		for i := range acked[who] {
			if acked[who][i].Load() {
				n++
			}
		}
		return n
	}
	nSrc, nTgt := count("source"), count("standby")
	t.Logf("acknowledged: source %d, standby %d of %d each", nSrc, nTgt, writers*perWriter)
	if nTgt != writers*perWriter {
		t.Fatalf("the standby, the newer holder, had %d of %d writes fail", writers*perWriter-nTgt, writers*perWriter)
	}
	if nSrc == writers*perWriter {
		t.Fatal("the source finished every write before the standby's took it over: no race")
	}
	assertFenced(t, src, len(ps))
	for i := range ps {
		if e, _ := srv.srv.Epoch(filepath.Base(ps[i])); e != 2 {
			t.Errorf("replica %d: epoch %d, want the standby's 2", i, e)
		}
	}
	b := detachAll(t, tgt, srv, ps)
	for who, base := range map[string]int{"source": 0, "standby": 2 << 20} {
		for n := range acked[who] {
			if acked[who][n].Load() && b[base+n*4096] != byte(n%250+1) {
				t.Errorf("%s's acknowledged write %d is lost", who, n)
			}
		}
	}
}

// TestStandbyActivationReplicaUnreachable: a replica's server goes away
// after the standby connected (its node cut off during a live
// migration). With the default threshold the activation leaves that
// replica out: two of three hold every write the source acknowledged.
// The standby serves, the source is fenced, and the replica, back,
// is resynced until all three are identical. With threshold 1 an
// acknowledged write may stand on the missing replica alone, so the
// activation refuses and nothing is written.
func TestStandbyActivationReplicaUnreachable(t *testing.T) {
	for _, tc := range []struct {
		threshold int
		wantErr   string
	}{
		{threshold: 0},
		{threshold: 1, wantErr: "2 of 3 replicas reachable, 3 needed"},
	} {
		t.Run(fmt.Sprintf("threshold=%d", tc.threshold), func(t *testing.T) {
			ps := newReplicas(t, t.TempDir(), 4<<20, "a", "b", "c")
			var srvs []*replicaServer
			var uris []string
			for _, p := range ps {
				s := startReplicaServer(t, "127.0.0.1:0", p)
				srvs, uris = append(srvs, s), append(uris, s.uri(0))
			}
			ctx := context.Background()
			opts := small(Options{Epoch: 1, VoteThreshold: tc.threshold, RequestTimeout: time.Second})
			src, err := Open(ctx, uris, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer src.closeFiles()
			if err := src.WriteAt(ctx, block(1), 0); err != nil {
				t.Fatal(err)
			}
			opts.Epoch, opts.Standby = 2, true
			tgt, err := Open(ctx, uris, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer tgt.closeFiles()
			addrC := srvs[2].addr
			srvs[2].stop()
			if err := src.WriteAt(ctx, block(2), 4096); err != nil {
				t.Fatalf("source write with c gone: %v", err)
			}

			err = tgt.WriteAt(ctx, block(3), 8192)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("activation without c at threshold %d: %v, want %q", tc.threshold, err, tc.wantErr)
				}
				if err := src.WriteAt(ctx, block(4), 12288); err != nil {
					t.Fatalf("the source after a refused activation: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("the standby's first write with c gone: %v", err)
			}
			if !slices.Equal(tgt.Stale, []string{uris[2]}) {
				t.Errorf("stale after the activation: %v, want c", tgt.Stale)
			}
			assertFenced(t, src, 2)
			srvs[2] = startReplicaServer(t, addrC, ps[2])
			probeUntilHealthy(t, tgt, 2)
			if err := tgt.Close(ctx); err != nil {
				t.Fatal(err)
			}
			for _, s := range srvs {
				s.stop()
			}
			assertSame(t, ps)
			c, err := os.ReadFile(ps[2])
			if err != nil {
				t.Fatal(err)
			}
			for off, want := range map[int64]byte{0: 1, 4096: 2, 8192: 3} {
				if !bytes.Equal(c[off:off+4096], block(want)) {
					t.Errorf("c at %d after its resync: %d, want %d", off, c[off], want)
				}
			}
		})
	}
}
