package datapath

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

// startService runs a data path on state with its API on a socket, as
// cmd/datapath does, and returns a client of it.
func startService(t *testing.T, state string) (*Service, *Client) {
	t.Helper()
	svc, err := New(Config{StateDir: state, Frontend: "fuse-loop", Logger: slog.New(slog.NewTextHandler(testutil.LogWriter(t), nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	svc.TakeOver(ctx)
	sock := filepath.Join(t.TempDir(), "datapath.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: (&Server{Service: svc, Handover: svc.Handover}).Handler()}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	return svc, NewClient(sock)
}

// unstageAll removes whatever the service still serves when the test
// ends, so that a failing test leaves no device behind.
// newReplicas creates 16 MiB replica images with the given names in a
// folder of their own.
func newReplicas(t *testing.T, names ...string) []string {
	t.Helper()
	dir := t.TempDir()
	var ps []string
	for _, n := range names {
		ps = append(ps, filepath.Join(dir, n))
	}
	if err := replica.Create(ps, 16<<20); err != nil {
		t.Fatal(err)
	}
	return ps
}

func unstageAll(t *testing.T, svc *Service) {
	t.Cleanup(func() {
		for _, st := range svc.List() {
			if err := svc.Unstage(context.Background(), st.VolumeID, true); err != nil {
				t.Errorf("unstage %s: %v", st.VolumeID, err)
			}
		}
	})
}

func directIO(t *testing.T, dev string, write bool, p []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if write {
		_, err = f.WriteAt(p, off)
	} else {
		_, err = f.ReadAt(p, off)
	}
	if err != nil {
		t.Fatalf("%s at %d: %v", dev, off, err)
	}
}

// TestTakeOver: a volume staged by one data path is served by the next
// one on the same state folder, at the same device path with its data,
// after a planned handover; records follow stage and unstage, and bad
// requests are refused with what is wrong.
func TestTakeOver(t *testing.T) {
	testutil.RequireKernel(t)
	reps := newReplicas(t, "a", "b", "c")
	state := t.TempDir()
	svc, c := startService(t, state)
	unstageAll(t, svc)
	ctx := t.Context()
	req := StageRequest{VolumeID: "vol1", Replicas: reps, Epoch: 1, VoteThreshold: 2, ReadPattern: "fifo", StagingPath: "/staging/vol1"}

	for _, tc := range []struct {
		name string
		req  StageRequest
	}{
		{"bad id", StageRequest{VolumeID: "../x", Replicas: reps, Epoch: 1, StagingPath: "/s"}},
		{"no epoch", StageRequest{VolumeID: "v", Replicas: reps, StagingPath: "/s"}},
		{"no replicas", StageRequest{VolumeID: "v", Epoch: 1, StagingPath: "/s"}},
		{"bad pattern", StageRequest{VolumeID: "v", Replicas: reps, Epoch: 1, StagingPath: "/s", ReadPattern: "lifo"}},
	} {
		if _, err := c.Stage(ctx, tc.req); err == nil {
			t.Errorf("%s: staged", tc.name)
		}
	}

	st, err := c.Stage(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := c.Stage(ctx, req); err != nil || again.Device != st.Device {
		t.Errorf("staging again: %v, device %s; want the same %s", err, again.Device, st.Device)
	}
	other := req
	other.StagingPath = "/elsewhere"
	if _, err := c.Stage(ctx, other); !errors.Is(err, ErrConflict) {
		t.Errorf("staging at another path: %v, want ErrConflict", err)
	}
	if err := c.SetTarget(ctx, "vol1", Target{Path: "/pod/vol1", Single: true}, true); err != nil {
		t.Fatal(err)
	}
	pattern := bytes.Repeat([]byte("taken back "), 4096*4/11+1)[:4096*4]
	directIO(t, st.Device, true, pattern, 1<<20)

	// A quiesce holds the device's requests until resume.
	if err := c.Quiesce(ctx, "vol1", time.Minute); err != nil {
		t.Fatal(err)
	}
	if st, _ := c.Get(ctx, "vol1"); !st.Quiesced {
		t.Error("status does not say quiesced")
	}
	wrote := make(chan time.Time, 1)
	go func() {
		directIO(t, st.Device, true, pattern[:4096], 4<<20)
		wrote <- time.Now()
	}()
	select {
	case <-wrote:
		t.Fatal("a write went through a quiesced volume")
	case <-time.After(200 * time.Millisecond):
	}
	resumed := time.Now()
	if err := c.Resume(ctx, "vol1"); err != nil {
		t.Fatal(err)
	}
	if at := <-wrote; at.Before(resumed) {
		t.Error("the held write completed before the resume")
	}
	if err := c.Resume(ctx, "vol1"); err == nil {
		t.Error("resume of a volume not quiesced: no error")
	}
	if err := c.Quiesce(ctx, "nothing", time.Second); !errors.Is(err, ErrNotFound) {
		t.Errorf("quiesce of a volume not staged: %v, want ErrNotFound", err)
	}

	start := time.Now()
	if err := svc.Handover(ctx); err != nil {
		t.Fatalf("handover: %v", err)
	}
	svc2, c2 := startService(t, state)
	unstageAll(t, svc2)
	t.Logf("handover and takeover took %s", time.Since(start).Round(time.Millisecond))
	st2, err := c2.Get(ctx, "vol1")
	if err != nil {
		t.Fatal(err)
	}
	if st2.Device != st.Device || !st2.DeviceTakenBack || !st2.Targets["/pod/vol1"] || st2.StagingPath != req.StagingPath {
		t.Fatalf("after the takeover: %+v; want %s taken back with its target", st2, st.Device)
	}
	got := make([]byte, len(pattern))
	directIO(t, st2.Device, false, got, 1<<20)
	if !bytes.Equal(got, pattern) {
		t.Fatal("the device taken back does not read what was written before the handover")
	}
	if err := c2.Unstage(ctx, "vol1", 10*time.Second, false); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Get(ctx, "vol1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("after unstage: %v, want ErrNotFound", err)
	}
	if left, _ := filepath.Glob(filepath.Join(state, "volumes", "*")); len(left) > 0 {
		t.Errorf("records left after unstage: %v", left)
	}
	if err := c2.Unstage(ctx, "vol1", time.Second, false); err != nil {
		t.Errorf("unstaging again: %v", err)
	}
}

// TestHandoverDuringTakeOver: a successor may ask for the node while
// this data path is still taking its volumes back. The takeover stops,
// the volume it had not taken back yet keeps its record (the successor
// serves it; marking it lost would lose it for good), and nothing is
// staged afterwards: a volume served here after the handover would have
// two servers once the successor took it back.
func TestHandoverDuringTakeOver(t *testing.T) {
	state := t.TempDir()
	s := store{dir: filepath.Join(state, "volumes")}
	// Replicas whose server is not up yet: the takeover retries.
	missing := filepath.Join(t.TempDir(), "not-yet.img")
	rec := Record{StageRequest: StageRequest{VolumeID: "waiting", Replicas: []string{missing}, Epoch: 1, VoteThreshold: 1, ReadPattern: "quorum", StagingPath: "/s"},
		Frontend: "fuse-loop", Device: "/dev/loop99"}
	if err := s.save(rec); err != nil {
		t.Fatal(err)
	}
	svc, err := New(Config{StateDir: state, Frontend: "fuse-loop", TakeOverTimeout: time.Hour, Logger: slog.New(slog.NewTextHandler(testutil.LogWriter(t), nil))})
	if err != nil {
		t.Fatal(err)
	}
	tookOver := make(chan struct{})
	go func() {
		svc.TakeOver(t.Context())
		close(tookOver)
	}()
	time.Sleep(300 * time.Millisecond) // a few attempts
	if svc.Ready() {
		t.Fatal("ready while a recorded volume is not served yet")
	}
	if err := svc.Handover(t.Context()); err != nil {
		t.Fatalf("handover: %v", err)
	}
	select {
	case <-tookOver:
	case <-time.After(10 * time.Second):
		t.Fatal("the takeover goes on after the handover")
	}
	if svc.Ready() {
		t.Error("ready after the handover")
	}
	if got := svc.List(); len(got) != 0 {
		t.Errorf("serving %+v after the handover", got)
	}
	if _, err := os.Stat(s.path("waiting")); err != nil {
		t.Errorf("the record of the volume left to the successor: %v", err)
	}
	if _, err := svc.Stage(t.Context(), StageRequest{VolumeID: "new", Replicas: []string{missing}, Epoch: 1, StagingPath: "/s2"}); !errors.Is(err, ErrNotReady) {
		t.Errorf("stage after the handover: %v, want ErrNotReady", err)
	}
}

// TestLostDevice: a record whose device is gone is not served under a
// new device nobody holds: it is reported lost, its record removed.
func TestLostDevice(t *testing.T) {
	testutil.RequireKernel(t)
	reps := newReplicas(t, "a", "b")
	state := t.TempDir()
	s := store{dir: filepath.Join(state, "volumes")}
	rec := Record{StageRequest: StageRequest{VolumeID: "gone", Replicas: reps, Epoch: 1, VoteThreshold: 1, ReadPattern: "quorum", StagingPath: "/s"},
		Frontend: "fuse-loop", Device: "/dev/loop99"}
	if err := s.save(rec); err != nil {
		t.Fatal(err)
	}
	svc, c := startService(t, state)
	unstageAll(t, svc)
	st, err := c.Get(t.Context(), "gone")
	if err != nil || st.Lost == "" {
		t.Fatalf("volume with a gone device: %+v, %v; want it lost", st, err)
	}
	t.Logf("lost: %s", st.Lost)
	if _, err := os.Stat(s.path("gone")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the lost volume's record is still there: %v", err)
	}
	if err := c.Unstage(t.Context(), "gone", time.Second, false); err != nil {
		t.Errorf("unstage of a lost volume: %v", err)
	}
}
