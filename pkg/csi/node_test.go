package csi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/quorum-csi/quorum-csi/internal/alignbuf"
	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/internal/testutil"
	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/datapath"
	"github.com/quorum-csi/quorum-csi/pkg/metrics"
	"github.com/quorum-csi/quorum-csi/pkg/nbd"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// nodeEnv is env plus three real node agents n1..n3 (NBD with mutual TLS
// on 127.0.0.2..4, each with its local socket) and the Node services of
// n1 and n2, each served on its own socket as the node binary serves it.
type nodeEnv struct {
	*env
	tlsDir string
	nodes  map[string]csipb.NodeClient
	socks  map[string]string // each node's CSI socket
	local  map[string]string // each agent's local NBD socket
	// metrics gathers each node's staged volumes' metrics.
	metrics map[string]*prometheus.Registry
	data    map[string]string // each agent's data folder
	// stop stops a node's CSI server (not its data path).
	stop map[string]func()
	dps  map[string]*datapath.Client
}

func startNodeEnv(t *testing.T) *nodeEnv {
	testutil.RequireKernel(t)
	testutil.RequireTools(t, "mkfs.ext4", "blkid", "mount", "umount")
	e := &nodeEnv{env: startEnv(t), tlsDir: t.TempDir(), nodes: map[string]csipb.NodeClient{}, socks: map[string]string{}, local: map[string]string{},
		metrics: map[string]*prometheus.Registry{}, data: map[string]string{},
		stop: map[string]func(){}, dps: map[string]*datapath.Client{}}
	ips := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"}
	if err := nbd.GenerateDevCA(e.tlsDir, ips); err != nil {
		t.Fatal(err)
	}
	for i, ip := range ips {
		name := fmt.Sprintf("n%d", i+1)
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{corev1.LabelHostname: name}}}
		if err := e.c.Create(t.Context(), n); err != nil {
			t.Fatalf("create node %s: %v", name, err)
		}
		sock := e.startAgent(name, ip)
		e.local[name] = sock
		if i < 2 {
			e.startNode(name, sock)
		}
	}
	return e
}

// startAgent runs name's agent until the test ends and returns its local
// socket.
func (e *nodeEnv) startAgent(name, ip string) string {
	t := e.t
	tlsCfg, err := nbd.ServerTLSDir(e.tlsDir)
	if err != nil {
		t.Fatal(err)
	}
	addr := kubetest.FreeAddr(t, ip)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	e.data[name] = t.TempDir()
	kubetest.StartAgent(t, e.rc, agent.Config{
		Node: name, DataDir: e.data[name], Listen: addr, AdvertiseAddress: ip, TLS: tlsCfg, LocalSocket: sock,
		Logger: log.Log.WithName(name),
	})
	return sock
}

// startNode serves name's Node and Identity services on a socket, as
// cmd/node does, and connects a client to it; the node's data path is
// started with the first.
func (e *nodeEnv) startNode(name, localSocket string) {
	t := e.t
	dp, ok := e.dps[name]
	if !ok {
		reg := prometheus.NewRegistry()
		set, err := metrics.NewSet(reg)
		if err != nil {
			t.Fatal(err)
		}
		e.metrics[name] = reg
		dp = e.startDataPath(name, set)
		e.dps[name] = dp
	}
	n, err := NewNode(NodeConfig{NodeName: name, Client: e.c, TLSDir: e.tlsDir, LocalSocket: localSocket, DataPath: dp})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "csi.sock")
	srv := &Server{Endpoint: "unix://" + sock, Identity: NewIdentity(NodeProber{API: APIProber{Client: e.c}, DataPath: dp}), Node: n, Log: log.Log.WithName("csi-" + name)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Start(ctx) }()
	var once sync.Once
	e.stop[name] = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("CSI server of %s: %v", name, err)
			}
		})
	}
	t.Cleanup(e.stop[name])
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ids := csipb.NewIdentityClient(conn)
	e.poll("the node's CSI socket answering", func(ctx context.Context) bool {
		_, err := ids.GetPluginInfo(ctx, &csipb.GetPluginInfoRequest{})
		return err == nil
	})
	e.nodes[name] = csipb.NewNodeClient(conn)
	e.socks[name] = sock
}

// startDataPath runs name's data path (package datapath) with its API on
// a socket, as cmd/datapath does, and returns a client of it.
func (e *nodeEnv) startDataPath(name string, set *metrics.Set) *datapath.Client {
	t := e.t
	svc, err := datapath.New(datapath.Config{
		StateDir: t.TempDir(), RequestTimeout: 5 * time.Second, Metrics: set,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, nil)).With("node", name),
	})
	if err != nil {
		t.Fatal(err)
	}
	svc.TakeOver(t.Context())
	sock := filepath.Join(t.TempDir(), "datapath.sock")
	l, err := datapath.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: (&datapath.Server{Service: svc}).Handler()}
	go hs.Serve(l)
	// Runs before the agents stop (cleanups run last first), so volumes
	// still staged are detached while their replica servers answer.
	t.Cleanup(func() {
		hs.Close()
		for _, st := range svc.List() {
			if err := svc.Unstage(context.Background(), st.VolumeID, true); err != nil {
				t.Errorf("node %s: %v", name, err)
			}
		}
	})
	return datapath.NewClient(sock)
}

// unmountAll lazily unmounts paths still mounted when the test ends,
// so that a failing test leaves the machine clean.
func unmountAll(t *testing.T, paths ...string) {
	t.Cleanup(func() {
		for _, p := range paths {
			if unix.Unmount(p, 0) == nil {
				t.Errorf("%s was still mounted at the end", p)
			}
		}
	})
}

// paths of one node's use of a volume.
type nodePaths struct{ staging, target string }

func newPaths(t *testing.T) nodePaths {
	dir := t.TempDir()
	p := nodePaths{staging: filepath.Join(dir, "staging"), target: filepath.Join(dir, "pods", "target")}
	if err := os.MkdirAll(p.staging, 0o750); err != nil {
		t.Fatal(err)
	}
	// Reverse order: the target is unmounted before its source.
	unmountAll(t, p.target, p.staging)
	return p
}

// stage publishes vol to node (ControllerPublishVolume), then stages and
// publishes it there, each node call twice (idempotency), and returns
// the epoch.
func (e *nodeEnv) stage(vol *csipb.Volume, node string, c *csipb.VolumeCapability, p nodePaths) int64 {
	t := e.t
	t.Helper()
	pub, err := e.ctl.ControllerPublishVolume(t.Context(), &csipb.ControllerPublishVolumeRequest{
		VolumeId: vol.VolumeId, NodeId: node, VolumeCapability: c, VolumeContext: vol.VolumeContext,
	})
	if err != nil {
		t.Fatalf("ControllerPublishVolume to %s: %v", node, err)
	}
	epoch, err := strconv.ParseInt(pub.PublishContext[PublishContextEpoch], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	n := e.nodes[node]
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	for i := range 2 {
		if _, err := n.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{
			VolumeId: vol.VolumeId, PublishContext: pub.PublishContext, StagingTargetPath: p.staging,
			VolumeCapability: c, VolumeContext: vol.VolumeContext,
		}); err != nil {
			t.Fatalf("NodeStageVolume #%d on %s: %v", i+1, node, err)
		}
	}
	for i := range 2 {
		if _, err := n.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{
			VolumeId: vol.VolumeId, PublishContext: pub.PublishContext, StagingTargetPath: p.staging,
			TargetPath: p.target, VolumeCapability: c, VolumeContext: vol.VolumeContext,
		}); err != nil {
			t.Fatalf("NodePublishVolume #%d on %s: %v", i+1, node, err)
		}
	}
	return epoch
}

// unstage undoes stage, each call twice.
func (e *nodeEnv) unstage(vol *csipb.Volume, node string, p nodePaths) {
	t := e.t
	t.Helper()
	n := e.nodes[node]
	for i := range 2 {
		if _, err := n.NodeUnpublishVolume(t.Context(), &csipb.NodeUnpublishVolumeRequest{VolumeId: vol.VolumeId, TargetPath: p.target}); err != nil {
			t.Fatalf("NodeUnpublishVolume #%d on %s: %v", i+1, node, err)
		}
	}
	if _, err := os.Stat(p.target); !os.IsNotExist(err) {
		t.Errorf("target %s still there after NodeUnpublishVolume: %v", p.target, err)
	}
	for i := range 2 {
		if _, err := n.NodeUnstageVolume(t.Context(), &csipb.NodeUnstageVolumeRequest{VolumeId: vol.VolumeId, StagingTargetPath: p.staging}); err != nil {
			t.Fatalf("NodeUnstageVolume #%d on %s: %v", i+1, node, err)
		}
	}
	if _, err := e.ctl.ControllerUnpublishVolume(t.Context(), &csipb.ControllerUnpublishVolumeRequest{VolumeId: vol.VolumeId, NodeId: node}); err != nil {
		t.Fatalf("ControllerUnpublishVolume from %s: %v", node, err)
	}
}

func (e *nodeEnv) create(name string, c *csipb.VolumeCapability) *csipb.Volume {
	t := e.t
	t.Helper()
	resp, err := e.ctl.CreateVolume(t.Context(), &csipb.CreateVolumeRequest{
		Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csipb.VolumeCapability{c}, Parameters: map[string]string{ParamReplicas: "3"},
	})
	if err != nil {
		t.Fatalf("CreateVolume %s: %v", name, err)
	}
	e.waitFor(resp.Volume.VolumeId, "three Healthy replicas", qvtest.Ready)
	return resp.Volume
}

// TestNodeStageFilesystem: a file written through n1's mount reads back
// through n2's after the attachment moved, with every node call
// idempotent and the stats of the mounted volume reported.
func TestNodeStageFilesystem(t *testing.T) {
	e := startNodeEnv(t)
	info, err := e.nodes["n1"].NodeGetInfo(t.Context(), &csipb.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.NodeId != "n1" || info.AccessibleTopology.GetSegments()[TopologyKeyNode] != "n1" {
		t.Errorf("NodeGetInfo = %v, want node n1 with topology %s=n1", info, TopologyKeyNode)
	}
	c := mountCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "ext4")
	vol := e.create("pvc-fs", c)

	p1 := newPaths(t)
	if epoch := e.stage(vol, "n1", c, p1); epoch != 1 {
		t.Errorf("epoch on n1 = %d, want 1", epoch)
	}
	data := bytes.Repeat([]byte("quorum-csi node test\n"), 50000)
	want := sha256.Sum256(data)
	if err := os.WriteFile(filepath.Join(p1.target, "data"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	stats, err := e.nodes["n1"].NodeGetVolumeStats(t.Context(), &csipb.NodeGetVolumeStatsRequest{VolumeId: vol.VolumeId, VolumePath: p1.target})
	if err != nil {
		t.Fatalf("NodeGetVolumeStats: %v", err)
	}
	if u := stats.Usage; len(u) != 2 || u[0].Total <= 0 || u[0].Used < int64(len(data)) || u[1].Unit != csipb.VolumeUsage_INODES || u[1].Total <= 0 {
		t.Errorf("NodeGetVolumeStats = %v, want bytes with at least %d used and inodes", u, len(data))
	}
	_, err = e.nodes["n1"].NodeGetVolumeStats(t.Context(), &csipb.NodeGetVolumeStatsRequest{VolumeId: vol.VolumeId, VolumePath: filepath.Join(t.TempDir(), "nothing")})
	if status.Code(err) != codes.NotFound {
		t.Errorf("NodeGetVolumeStats of a missing path: %v, want NotFound", err)
	}
	_, err = e.nodes["n1"].NodeExpandVolume(t.Context(), &csipb.NodeExpandVolumeRequest{
		VolumeId: vol.VolumeId, VolumePath: p1.target, CapacityRange: &csipb.CapacityRange{RequiredBytes: 128 << 20},
	})
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("NodeExpandVolume of a staged volume beyond its device: %v, want FailedPrecondition", err)
	}
	exp, err := e.nodes["n1"].NodeExpandVolume(t.Context(), &csipb.NodeExpandVolumeRequest{
		VolumeId: vol.VolumeId, VolumePath: p1.target, CapacityRange: &csipb.CapacityRange{RequiredBytes: 64 << 20},
	})
	if err != nil || exp.CapacityBytes != 64<<20 {
		t.Errorf("NodeExpandVolume within the device: %v, %v; want 64 MiB", exp, err)
	}
	health, err := e.nodes["n1"].NodeGetVolumeHealth(t.Context(), &csipb.NodeGetVolumeHealthRequest{VolumeId: vol.VolumeId, VolumePublishPath: p1.target})
	if err != nil || len(health.GetVolumeHealth().GetHealthStatuses()) != 0 {
		t.Errorf("NodeGetVolumeHealth of a volume with three healthy replicas: %v, %v; want no adverse status", health, err)
	}
	if _, err := e.nodes["n2"].NodeGetVolumeHealth(t.Context(), &csipb.NodeGetVolumeHealthRequest{VolumeId: vol.VolumeId}); status.Code(err) != codes.NotFound {
		t.Errorf("NodeGetVolumeHealth on a node that did not stage the volume: %v, want NotFound", err)
	}
	// mkfs wrote through the device: the staged volume is measured.
	if got := e.series("n1", vol.VolumeId); got["quorum_volume_requests_total/write"] == 0 || got["quorum_replica_state/healthy"] != 3 ||
		got["quorum_volume_request_seconds/write"] == 0 {
		t.Errorf("n1's metrics of the staged volume: %v; want writes counted and timed, and 3 healthy replicas", got)
	}
	// A restarted plugin knows what the data path serves: stats,
	// unpublish and unstage work for the volume staged before.
	e.stop["n1"]()
	e.startNode("n1", e.local["n1"])
	if _, err := e.nodes["n1"].NodeGetVolumeStats(t.Context(), &csipb.NodeGetVolumeStatsRequest{VolumeId: vol.VolumeId, VolumePath: p1.target}); err != nil {
		t.Errorf("NodeGetVolumeStats after a restart of the plugin: %v", err)
	}
	if _, err := e.nodes["n1"].NodePublishVolume(t.Context(), &csipb.NodePublishVolumeRequest{
		VolumeId: vol.VolumeId, StagingTargetPath: p1.staging, TargetPath: filepath.Join(t.TempDir(), "second"), VolumeCapability: mountCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER, "ext4"),
	}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("a SINGLE_NODE_SINGLE_WRITER publish beside the one made before the restart: %v, want FailedPrecondition", err)
	}
	e.unstage(vol, "n1", p1)
	if got := e.series("n1", vol.VolumeId); len(got) != 0 {
		t.Errorf("n1's metrics after unstage: %v, want the volume's series gone", got)
	}

	p2 := newPaths(t)
	if epoch := e.stage(vol, "n2", c, p2); epoch != 2 {
		t.Errorf("epoch on n2 = %d, want 2", epoch)
	}
	// n1 lost the attachment: even its own replica, through its agent's
	// local socket, refuses the old epoch.
	local := fmt.Sprintf("nbds+unix:///%s?socket=%s&tls-certificates=%s&tls-hostname=localhost", vol.VolumeId, e.local["n1"], e.tlsDir)
	_, err = volume.Open(t.Context(), []string{local}, volume.Options{VoteThreshold: 1, Epoch: 1, Logger: slog.New(slog.DiscardHandler)})
	if !errors.Is(err, nbd.ErrFenced) {
		t.Errorf("open of n1's replica through its local socket with epoch 1 after epoch 2 took over: %v, want %v", err, nbd.ErrFenced)
	}
	got, err := os.ReadFile(filepath.Join(p2.target, "data"))
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != want {
		t.Errorf("the file read on n2 differs from what n1 wrote (%d bytes, want %d)", len(got), len(data))
	}
	before := fsSize(t, p2.target)
	e.unstage(vol, "n2", p2)

	// Offline expansion: the volume grows while unstaged, and the next
	// stage grows the filesystem before mounting it (online growth may
	// lack CAP_SYS_RESOURCE), so NodeExpandVolume has nothing left to do.
	if _, err := e.ctl.ControllerExpandVolume(t.Context(), &csipb.ControllerExpandVolumeRequest{
		VolumeId: vol.VolumeId, CapacityRange: &csipb.CapacityRange{RequiredBytes: 128 << 20}, VolumeCapability: c,
	}); err != nil {
		t.Fatalf("ControllerExpandVolume: %v", err)
	}
	e.poll("the agents to grow the replicas to 128 MiB", func(context.Context) bool {
		grown := 0
		for _, n := range []string{"n1", "n2", "n3"} {
			images, _ := filepath.Glob(filepath.Join(e.data[n], vol.VolumeId, "*.img"))
			for _, img := range images {
				if fi, err := os.Stat(img); err == nil && fi.Size() == 128<<20 {
					grown++
				}
			}
		}
		return grown == 3
	})
	p3 := newPaths(t)
	e.stage(vol, "n2", c, p3)
	if after := fsSize(t, p3.target); after < before+48<<20 {
		t.Errorf("filesystem of %d bytes after growing the volume from 64 to 128 MiB, %d before", after, before)
	}
	exp, err = e.nodes["n2"].NodeExpandVolume(t.Context(), &csipb.NodeExpandVolumeRequest{
		VolumeId: vol.VolumeId, VolumePath: p3.target, CapacityRange: &csipb.CapacityRange{RequiredBytes: 128 << 20},
	})
	if err != nil || exp.CapacityBytes != 128<<20 {
		t.Errorf("NodeExpandVolume after the stage grew the filesystem: %v, %v; want 128 MiB", exp, err)
	}
	if got, err := os.ReadFile(filepath.Join(p3.target, "data")); err != nil || sha256.Sum256(got) != want {
		t.Errorf("the file after the expansion: %v, or its contents differ", err)
	}
	e.unstage(vol, "n2", p3)
}

// fsSize is the size of the filesystem mounted at path.
func fsSize(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

// TestNodeStageBlock: the published block file is the volume's device;
// a pattern written with O_DIRECT reads back.
func TestNodeStageBlock(t *testing.T) {
	e := startNodeEnv(t)
	c := blockCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
	vol := e.create("pvc-block", c)
	p := newPaths(t)
	e.stage(vol, "n1", c, p)

	const off, size = 1 << 20, 64 << 10
	buf := alignbuf.Make(size, size)
	for i := range buf {
		buf[i] = byte(i*7 + i/4096)
	}
	f, err := os.OpenFile(p.target, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(buf, off); err != nil {
		t.Fatalf("write the block file: %v", err)
	}
	got := alignbuf.Make(size, size)
	if _, err := f.ReadAt(got, off); err != nil {
		t.Fatalf("read the block file: %v", err)
	}
	f.Close()
	if !bytes.Equal(got, buf) {
		t.Error("the block file read back differs from what was written")
	}
	stats, err := e.nodes["n1"].NodeGetVolumeStats(t.Context(), &csipb.NodeGetVolumeStatsRequest{VolumeId: vol.VolumeId, VolumePath: p.target})
	if err != nil {
		t.Fatalf("NodeGetVolumeStats: %v", err)
	}
	if u := stats.Usage; len(u) != 1 || u[0].Total != 64<<20 {
		t.Errorf("NodeGetVolumeStats of the block file = %v, want a total of 64 MiB", u)
	}
	e.unstage(vol, "n1", p)
}

// series sums node's metrics of one volume by family and op or state
// label: counters by value, histograms by sample count, replica states by
// the replicas in each.
func (e *nodeEnv) series(node, volume string) map[string]float64 {
	e.t.Helper()
	families, err := e.metrics[node].Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["volume"] != volume {
				continue
			}
			key := f.GetName() + "/" + labels["op"] + labels["state"]
			switch {
			case m.Counter != nil:
				got[key] += m.Counter.GetValue()
			case m.Histogram != nil:
				got[key] += float64(m.Histogram.GetSampleCount())
			case m.Gauge != nil:
				got[key] += m.Gauge.GetValue()
			}
		}
	}
	return got
}

// TestNodeStageStandby: the second publish of an RWX Block volume (a live
// migration's target) reaches the target node's data path as a standby
// with the newer epoch, while the source stays active; the target's
// first write activates it, and once the source is unstaged and
// unpublished (the migration confirmed) the target is the only, Active,
// attachment.
func TestNodeStageStandby(t *testing.T) {
	e := startNodeEnv(t)
	ctx := t.Context()
	c := blockCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)
	vol := e.create("pvc-migrate", c)
	src, dst := newPaths(t), newPaths(t)
	for _, tc := range []struct {
		node    string
		p       nodePaths
		epoch   int64
		standby bool
	}{
		{"n1", src, 1, false},
		{"n2", dst, 2, true},
	} {
		if epoch := e.stage(vol, tc.node, c, tc.p); epoch != tc.epoch {
			t.Errorf("%s staged with epoch %d, want %d", tc.node, epoch, tc.epoch)
		}
		st, err := e.dps[tc.node].Get(ctx, vol.VolumeId)
		if err != nil {
			t.Fatalf("data path of %s: %v", tc.node, err)
		}
		if st.Standby != tc.standby || st.Epoch != uint64(tc.epoch) {
			t.Errorf("data path of %s: standby %t, epoch %d; want %t, %d", tc.node, st.Standby, st.Epoch, tc.standby, tc.epoch)
		}
	}

	buf := alignbuf.Make(4096, 4096)
	f, err := os.OpenFile(dst.target, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt(buf, 0)
	f.Close()
	if err != nil {
		t.Fatalf("the target's first write: %v", err)
	}
	if st, err := e.dps["n2"].Get(ctx, vol.VolumeId); err != nil || st.Standby {
		t.Errorf("data path of n2 after its first write: %+v, %v; want active", st, err)
	}

	e.unstage(vol, "n1", src)
	if a := e.get(vol.VolumeId).Status.Attachments; len(a) != 1 || a[0].Node != "n2" || a[0].Role != v1alpha1.AttachmentActive {
		t.Errorf("attachments %+v after the source went, want n2 alone and Active", a)
	}
	e.unstage(vol, "n2", dst)
}
