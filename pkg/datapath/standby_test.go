package datapath

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/quorum-csi/quorum-csi/internal/alignbuf"
	"github.com/quorum-csi/quorum-csi/internal/testutil"
	"github.com/quorum-csi/quorum-csi/pkg/nbd"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// serveReplicas serves the replica images over NBD on loopback, as a
// node's agent does, and returns their URIs.
func serveReplicas(t *testing.T, paths ...string) []string {
	t.Helper()
	var exports []nbd.Export
	var uris []string
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range paths {
		r, err := replica.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		xs, closer, err := volume.ReplicaExports(r, filepath.Base(p), false)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { closer() })
		exports = append(exports, xs...)
		uris = append(uris, "nbd://"+l.Addr().String()+"/"+filepath.Base(p))
	}
	srv, err := nbd.NewServer(nbd.ServerConfig{Exports: exports, Logger: slog.New(slog.NewTextHandler(testutil.LogWriter(t), nil))})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return uris
}

// writeErr writes p at off of dev, bypassing the page cache.
func writeErr(dev string, p []byte, off int64) error {
	f, err := os.OpenFile(dev, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.WriteAt(p, off)
	return err
}

func recordOnDisk(t *testing.T, state, id string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, "volumes", id+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestStandbyStage: a live migration between two data paths (two
// nodes). The target, staged as a standby with a newer epoch, reads
// the source's data while the source writes on; it stays a standby
// through a handover to a successor data path (its record says so);
// its first write activates it, which its record then says, and the
// source's writes fail from then on; the source unstages cleanly.
func TestStandbyStage(t *testing.T) {
	testutil.RequireKernel(t)
	reps := newReplicas(t, "a", "b", "c")
	uris := serveReplicas(t, reps...)
	ctx := t.Context()
	srcSvc, src := startService(t, t.TempDir())
	unstageAll(t, srcSvc)
	req := StageRequest{VolumeID: "vol1", Replicas: uris, Epoch: 1, VoteThreshold: 2, ReadPattern: "fifo", StagingPath: "/staging/vol1", Block: true}
	srcSt, err := src.Stage(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	one := alignbuf.Make(4096, 4096)
	for i := range one {
		one[i] = 1
	}
	directIO(t, srcSt.Device, true, one, 0)

	tgtState := t.TempDir()
	tgtSvc, tgt := startService(t, tgtState)
	req.Epoch, req.Standby = 2, true
	st, err := tgt.Stage(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Standby {
		t.Fatalf("staged as a standby, status %+v", st)
	}
	if rec := recordOnDisk(t, tgtState, "vol1"); rec["standby"] != true || rec["version"] != float64(2) {
		t.Fatalf("standby's record: %v", rec)
	}
	got := alignbuf.Make(4096, 4096)
	directIO(t, st.Device, false, got, 0)
	if !bytes.Equal(got, one) {
		t.Fatal("the standby does not read the source's data")
	}
	if err := writeErr(srcSt.Device, one, 4096); err != nil {
		t.Fatalf("source write with a standby staged: %v", err)
	}

	if err := tgtSvc.Handover(ctx); err != nil {
		t.Fatal(err)
	}
	tgtSvc, tgt = startService(t, tgtState)
	unstageAll(t, tgtSvc)
	if st, err = tgt.Get(ctx, "vol1"); err != nil || !st.Standby || !st.DeviceTakenBack {
		t.Fatalf("standby after a handover: %+v, %v; want a standby taken back", st, err)
	}
	if err := writeErr(srcSt.Device, one, 8192); err != nil {
		t.Fatalf("source write after the standby's handover: %v", err)
	}

	two := alignbuf.Make(4096, 4096)
	for i := range two {
		two[i] = 2
	}
	directIO(t, st.Device, true, two, 4096)
	deadline := time.Now().Add(10 * time.Second)
	for recordOnDisk(t, tgtState, "vol1")["standby"] == true {
		if time.Now().After(deadline) {
			t.Fatal("the record still says standby 10s after the activation")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st, _ := tgt.Get(ctx, "vol1"); st.Standby {
		t.Error("status says standby after the first write")
	}
	if err := tgt.Activate(ctx, "vol1"); err != nil {
		t.Errorf("activate an active volume: %v", err)
	}
	if err := tgt.Activate(ctx, "nothing"); !errors.Is(err, ErrNotFound) {
		t.Errorf("activate a volume not staged: %v, want ErrNotFound", err)
	}
	if err := writeErr(srcSt.Device, one, 12288); err == nil {
		t.Fatal("the source could write after the target's activation")
	}
	if st, _ := src.Get(ctx, "vol1"); !st.Fenced {
		t.Errorf("source's status after the switchover: %+v, want fenced", st)
	}
	if err := src.Unstage(ctx, "vol1", 10*time.Second, false); err != nil {
		t.Fatalf("unstage of the fenced source: %v", err)
	}
	if err := tgt.Unstage(ctx, "vol1", 10*time.Second, false); err != nil {
		t.Fatal(err)
	}
}

// TestActivateAPI: a standby activated through the API takes the
// replicas over at once; its record and status follow.
func TestActivateAPI(t *testing.T) {
	testutil.RequireKernel(t)
	reps := newReplicas(t, "a", "b")
	uris := serveReplicas(t, reps...)
	state := t.TempDir()
	svc, c := startService(t, state)
	unstageAll(t, svc)
	ctx := t.Context()
	req := StageRequest{VolumeID: "vol2", Replicas: uris, Epoch: 5, VoteThreshold: 1, ReadPattern: "quorum", StagingPath: "/s", Standby: true}
	if _, err := c.Stage(ctx, req); err != nil {
		t.Fatal(err)
	}
	epoch := func() string {
		b, _ := os.ReadFile(replica.EpochPath(reps[0]))
		return string(bytes.TrimSpace(b))
	}
	if e := epoch(); e != "" {
		t.Fatalf("a standby stored epoch %q", e)
	}
	if err := c.Activate(ctx, "vol2"); err != nil {
		t.Fatal(err)
	}
	if e := epoch(); e != "5" {
		t.Errorf("epoch after the activation: %q, want 5", e)
	}
	if st, _ := c.Get(ctx, "vol2"); st.Standby || recordOnDisk(t, state, "vol2")["standby"] == true {
		t.Errorf("after the activation: status %+v, record %v", st, recordOnDisk(t, state, "vol2"))
	}
}
