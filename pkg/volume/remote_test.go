package volume

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
	"github.com/quorum-csi/quorum-csi/pkg/nbd"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

// replicaServer serves local replica images over NBD on loopback, as
// `quorumctl serve` does.
type replicaServer struct {
	t      *testing.T
	paths  []string
	addr   string
	srv    *nbd.Server
	files  []*replica.File
	closer []func() error
	done   chan error
}

func startReplicaServer(t *testing.T, addr string, paths ...string) *replicaServer {
	t.Helper()
	s := &replicaServer{t: t, paths: paths}
	var exports []nbd.Export
	for _, p := range paths {
		r, err := replica.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		s.files = append(s.files, r)
		xs, closer, err := ReplicaExports(r, filepath.Base(p), true)
		if err != nil {
			t.Fatal(err)
		}
		exports = append(exports, xs...)
		s.closer = append(s.closer, closer)
	}
	srv, err := nbd.NewServer(nbd.ServerConfig{Exports: exports, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	var l net.Listener
	for try := 0; ; try++ {
		if l, err = net.Listen("tcp", addr); err == nil || try == 50 {
			break
		}
		time.Sleep(100 * time.Millisecond) // the old listener's port, on restart
	}
	if err != nil {
		t.Fatal(err)
	}
	s.srv, s.addr, s.done = srv, l.Addr().String(), make(chan error, 1)
	go func() { s.done <- srv.Serve(l) }()
	t.Cleanup(s.stop)
	return s
}

func (s *replicaServer) uri(i int) string {
	return "nbd://" + s.addr + "/" + filepath.Base(s.paths[i])
}

// servedReplicas creates three 4 MiB replicas and serves them all from
// one server, which uris name in order.
func servedReplicas(t *testing.T) (ps []string, srv *replicaServer, uris []string) {
	t.Helper()
	ps = newReplicas(t, t.TempDir(), 4<<20, "a", "b", "c")
	srv = startReplicaServer(t, "127.0.0.1:0", ps...)
	return ps, srv, []string{srv.uri(0), srv.uri(1), srv.uri(2)}
}

// stop ends the server abruptly (connections dropped, as when its
// process dies) and releases the replicas.
func (s *replicaServer) stop() {
	if s.srv == nil {
		return
	}
	s.srv.Close()
	<-s.done
	for _, c := range s.closer {
		c()
	}
	for _, f := range s.files {
		f.Close()
	}
	s.srv = nil
}

func TestRemoteReplicas(t *testing.T) {
	dir := t.TempDir()
	ps := newReplicas(t, dir, 4<<20, "a", "b", "c")
	srv := startReplicaServer(t, "127.0.0.1:0", ps[1:]...)
	ctx := context.Background()
	v, err := Open(ctx, []string{ps[0], srv.uri(0), srv.uri(1)}, Options{Epoch: 1})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("remote!!"), 8192)
	if err := v.WriteAt(ctx, data, 1<<20); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := v.ReadAt(ctx, got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	if err := v.Close(ctx); err != nil {
		t.Fatal(err)
	}
	srv.stop()
	for _, p := range ps {
		if m := meta(t, p); m.Generation != 1 || m.State != replica.StateClean {
			t.Errorf("%s after close: %+v", p, m)
		}
	}
	for _, p := range ps[1:] {
		if _, err := os.Stat(replica.JournalPath(p)); err != nil {
			t.Errorf("remote replica got no journal record: %v", err)
		}
		if e, err := nbd.EpochFile(replica.EpochPath(p)).LoadEpoch(); err != nil || e != 1 {
			t.Errorf("%s: epoch %d (%v), want 1", p, e, err)
		}
	}
	assertSame(t, ps)
}

// TestRemoteReplicaReturnsAndResyncs: a replica server that stays away
// longer than the request timeout costs the volume that replica (the
// first write waits for it that long), and the replica resyncs when its
// server is back.
func TestRemoteReplicaReturnsAndResyncs(t *testing.T) {
	dir := t.TempDir()
	ps := newReplicas(t, dir, 4<<20, "a", "b", "c")
	srvB := startReplicaServer(t, "127.0.0.1:0", ps[1])
	srvC := startReplicaServer(t, "127.0.0.1:0", ps[2])
	ctx := context.Background()
	const timeout = time.Second
	v, err := Open(ctx, []string{ps[0], srvB.uri(0), srvC.uri(0)}, Options{Epoch: 3, RequestTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	defer v.closeFiles()
	addrC := srvC.addr
	srvC.stop()
	start := time.Now()
	for i := range 16 {
		if err := v.WriteAt(ctx, bytes.Repeat([]byte{byte(i + 1)}, 4096), int64(i)<<18); err != nil {
			t.Fatalf("write with c down: %v", err)
		}
	}
	if !v.Faulty(2) {
		t.Fatal("c is down but not faulty")
	}
	if d := time.Since(start); d < timeout-100*time.Millisecond {
		t.Fatalf("c faulty after %v, before its requests' timeout of %v", d, timeout)
	}
	startReplicaServer(t, addrC, ps[2])
	probeUntilHealthy(t, v, 2)
	if err := v.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

// probeUntilHealthy probes v, as the attach's probe loop does, until its
// replica i is back and resynced.
func probeUntilHealthy(t *testing.T, v *Volume, i int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for v.Status()[i].State != quorum.ChildHealthy {
		if time.Now().After(deadline) {
			t.Fatalf("replica %d did not come back: %+v", i, v.Status())
		}
		v.Probe(context.Background())
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRemoteReplicaServerRestarts: replica servers restarted one after
// the other during writes (a rolling upgrade of the nodes' data paths),
// each back within the request timeout. The volume loses no replica and
// raises no event, its writes (data, and journal records on the
// sidecar exports) all succeed, and it closes clean with the replicas
// identical.
func TestRemoteReplicaServerRestarts(t *testing.T) {
	dir := t.TempDir()
	ps := newReplicas(t, dir, 4<<20, "a", "b", "c")
	srvs := []*replicaServer{startReplicaServer(t, "127.0.0.1:0", ps[1]), startReplicaServer(t, "127.0.0.1:0", ps[2])}
	ctx := context.Background()
	var events testutil.Log[quorum.Event]
	v, err := Open(ctx, []string{ps[0], srvs[0].uri(0), srvs[1].uri(0)}, Options{
		Epoch: 4, RequestTimeout: 10 * time.Second,
		OnEvent: events.Add,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer v.closeFiles()
	stop := make(chan struct{})
	written := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				written <- nil
				return
			default:
			}
			p := bytes.Repeat([]byte{byte(i + 1)}, 64<<10)
			if err := v.WriteAt(ctx, p, int64(i%64)<<16); err != nil {
				written <- err
				return
			}
		}
	}()
	for k, s := range srvs {
		time.Sleep(200 * time.Millisecond)
		addr := s.addr
		s.stop()
		time.Sleep(300 * time.Millisecond)
		srvs[k] = startReplicaServer(t, addr, s.paths...)
	}
	time.Sleep(200 * time.Millisecond)
	close(stop)
	if err := <-written; err != nil {
		t.Fatalf("write across the restarts: %v", err)
	}
	for i := range 3 {
		if v.Faulty(i) {
			t.Errorf("replica %d faulty after restarts within the timeout", i)
		}
	}
	if ev := events.All(); len(ev) > 0 {
		t.Errorf("events across restarts within the timeout: %+v", ev)
	}
	if err := v.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for _, s := range srvs {
		s.stop()
	}
	for _, p := range ps {
		if m := meta(t, p); m.State != replica.StateClean {
			t.Errorf("%s after close: %+v", p, m)
		}
	}
	assertSame(t, ps)
}

func TestRemoteFencing(t *testing.T) {
	ps, srv, uris := servedReplicas(t)
	ctx := context.Background()
	old, err := Open(ctx, uris, Options{Epoch: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer old.closeFiles()
	if err := old.WriteAt(ctx, bytes.Repeat([]byte{1}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	cur, err := Open(ctx, uris, Options{Epoch: 2})
	if err != nil {
		t.Fatalf("newer epoch: %v", err)
	}
	if err := old.WriteAt(ctx, bytes.Repeat([]byte{9}, 4096), 4096); err == nil {
		t.Fatal("the fenced holder could still write")
	}
	if err := cur.WriteAt(ctx, bytes.Repeat([]byte{2}, 4096), 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, uris, Options{Epoch: 1}); err == nil || !strings.Contains(err.Error(), "fenced") {
		t.Fatalf("attach with the old epoch again: err = %v, want fenced", err)
	}
	b := detachAll(t, cur, srv, ps)
	if b[0] != 1 || b[4096] != 2 {
		t.Fatalf("replica holds %d at 0 and %d at 4096, want 1 (old holder, before the new epoch) and 2 (new holder)", b[0], b[4096])
	}
}

func TestRemoteRefuses(t *testing.T) {
	dir := t.TempDir()
	ps := newReplicas(t, dir, 1<<20, "a", "b")
	other := newReplicas(t, dir, 1<<20, "x")
	srv := startReplicaServer(t, "127.0.0.1:0", ps[1], other[0])
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		specs []string
		opts  Options
		want  string
	}{
		{"no epoch", []string{ps[0], srv.uri(0)}, Options{}, "needs an epoch"},
		{"other volume", []string{ps[0], srv.uri(1)}, Options{Epoch: 1}, "belongs to volume"},
		{"twice", []string{srv.uri(0), srv.uri(0)}, Options{Epoch: 1}, "given twice"},
		{"no such export", []string{ps[0], "nbd://" + srv.addr + "/nope"}, Options{Epoch: 1}, "nope"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, err := Open(ctx, tc.specs, tc.opts)
			if err == nil {
				v.Close(ctx)
				t.Fatal("opened")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to say %q", err, tc.want)
			}
		})
	}
}

func TestSidecarKeepsIdentity(t *testing.T) {
	ps := newReplicas(t, t.TempDir(), 1<<20, "a")
	r, err := replica.Open(ps[0])
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	s := NewSidecar(r)
	ctx := context.Background()
	block := make([]byte, metaBlock)
	if err := s.ReadAt(ctx, block, 0); err != nil {
		t.Fatal(err)
	}
	m, err := replica.ParseMeta(bytes.TrimRight(block, "\x00"), "sidecar")
	if err != nil {
		t.Fatal(err)
	}
	write := func(m replica.Meta) error {
		b := make([]byte, metaBlock)
		copy(b, m.Marshal())
		return s.WriteAt(ctx, b, 0)
	}
	stolen := m
	stolen.VolumeID = "another"
	if err := write(stolen); !errors.Is(err, syscall.EPERM) {
		t.Errorf("identity change: err = %v, want EPERM", err)
	}
	if err := s.WriteAt(ctx, block[:512], 0); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("partial metadata write: err = %v, want EINVAL", err)
	}
	m.Generation = 7
	if err := write(m); err != nil {
		t.Fatal(err)
	}
	if got := meta(t, ps[0]); got.Generation != 7 || got.VolumeID != m.VolumeID {
		t.Errorf("metadata after the write: %+v", got)
	}
}
