// Package controlplane runs the QuorumVolume controller and three node
// agents together against a real kube-apiserver: the integration of the
// two sides of the contract in pkg/contract/doc.go (the controller's and
// the agent's: pkg/controller/doc.go, pkg/agent/doc.go),
// which their own tests exercise only with the test playing the other
// side.
package controlplane

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/yaml"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/controller"
	"github.com/quorum-csi/quorum-csi/pkg/nbd"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

const (
	mib = 1 << 20
	// timeout bounds every wait; the steps take a few seconds each.
	timeout = 60 * time.Second
	// leaseDuration is the agents' Lease: short, so that a stopped agent
	// is noticed within seconds; long enough that a busy machine running
	// the race detector does not miss renewals every 300 ms.
	leaseDuration = 3 * time.Second
	renewInterval = 300 * time.Millisecond
)

func TestMain(m *testing.M) {
	flag.Parse()
	// The controller and the agents log through their own loggers (to the
	// test log); this only catches controller-runtime's global logging,
	// which otherwise complains that no logger was set.
	log.SetLogger(logr.Discard())
	os.Exit(m.Run())
}

// nodeAgent is one node: its Node object, address and data folder, and
// the agent serving it while running.
type nodeAgent struct {
	node, ip, dataDir string
	listen            string // ip:port, kept across restarts
	run               *kubetest.Agent
}

// cluster is a real API server with the CRD, the controller manager and
// the node agents, all in this process but for etcd, kube-apiserver and
// kubectl.
type cluster struct {
	t        *testing.T
	srv      *kubetest.Server
	c        client.Client
	tlsDir   string
	cacheDir string // kubectl's discovery cache, kept under t.TempDir
	agents   []*nodeAgent
}

// startCluster installs the CRD with kubectl, creates the driver namespace
// and three Nodes n1..n3 labelled with their hostname, and runs the
// controller and an agent for each node on 127.0.0.2..4 with mutual TLS.
func startCluster(t *testing.T) *cluster {
	srv := kubetest.Start(t)
	c, err := client.New(srv.Config, client.Options{Scheme: qvtest.Scheme(t)})
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	cl := &cluster{t: t, srv: srv, c: c, tlsDir: t.TempDir(), cacheDir: t.TempDir()}
	_, self, _, _ := runtime.Caller(0)
	cl.kubectl("apply", "-f", filepath.Join(filepath.Dir(self), "..", "..", "config", "crd"))
	cl.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/quorumvolumes.quorum.csi.dev")
	cl.poll("QuorumVolumes served", func() bool { return c.List(t.Context(), &v1alpha1.QuorumVolumeList{}) == nil })
	if err := c.Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: contract.DefaultNamespace}}); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	ips := []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"}
	if err := nbd.GenerateDevCA(cl.tlsDir, ips); err != nil {
		t.Fatal(err)
	}
	cl.startController()
	for i, ip := range ips {
		// A fixed address rather than ip:0, so that a restarted agent
		// serves where its replica's endpoint says.
		a := &nodeAgent{node: fmt.Sprintf("n%d", i+1), ip: ip, dataDir: t.TempDir(), listen: kubetest.FreeAddr(t, ip)}
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: a.node, Labels: map[string]string{corev1.LabelHostname: a.node}}}
		if err := c.Create(t.Context(), node); err != nil {
			t.Fatalf("create node %s: %v", a.node, err)
		}
		cl.agents = append(cl.agents, a)
		cl.start(a)
	}
	return cl
}

// startController runs the controller manager as cmd/controller wires it,
// leader election included (with short durations), until the test ends.
func (cl *cluster) startController() {
	cl.srv.RunManager(cl.t, ctrl.Options{
		Scheme:                        cl.c.Scheme(),
		Logger:                        kubetest.Logger(cl.t, "component", "controller"),
		LeaderElection:                true,
		LeaderElectionID:              "quorum-controller",
		LeaderElectionNamespace:       contract.DefaultNamespace,
		LeaderElectionReleaseOnCancel: true,
		LeaseDuration:                 ptr.To(4 * time.Second),
		RenewDeadline:                 ptr.To(3 * time.Second),
		RetryPeriod:                   ptr.To(500 * time.Millisecond),
		Cache:                         controller.CacheOptions(contract.DefaultNamespace),
	}, func(mgr ctrl.Manager) error {
		r, err := controller.New(mgr.GetClient(), mgr.GetEventRecorder(controller.FieldManager), controller.Options{
			// Each test's controller gets its own registry: two in one process
			// would register quorum_volumes twice.
			Registerer: prometheus.NewRegistry(),
		})
		if err != nil {
			return err
		}
		return r.SetupWithManager(mgr)
	})
}

// start runs a's agent on its address and data folder.
func (cl *cluster) start(a *nodeAgent) {
	cl.t.Helper()
	tlsCfg, err := nbd.ServerTLSDir(cl.tlsDir)
	if err != nil {
		cl.t.Fatal(err)
	}
	a.run = kubetest.StartAgent(cl.t, cl.srv.Config, agent.Config{
		Node: a.node, DataDir: a.dataDir, Listen: a.listen, AdvertiseAddress: a.ip, TLS: tlsCfg,
		LeaseDuration: leaseDuration, RenewInterval: renewInterval,
		Logger: kubetest.Logger(cl.t, "component", a.node),
	})
}

// stop cancels a's agent and waits until Run returned, cleanly.
func (cl *cluster) stop(a *nodeAgent) { a.run.Stop() }

// kubectl runs kubectl with its discovery cache under t.TempDir (it would
// otherwise write to ~/.kube/cache) and fails the test on an error.
func (cl *cluster) kubectl(args ...string) string {
	cl.t.Helper()
	out, err := cl.tryKubectl(args...)
	if err != nil {
		cl.t.Fatal(err)
	}
	return out
}

func (cl *cluster) tryKubectl(args ...string) (string, error) {
	cl.t.Helper()
	return cl.srv.Kubectl(cl.t, append([]string{"--cache-dir", cl.cacheDir}, args...)...)
}

// applyYAML writes doc to a file and kubectl-applies it.
func (cl *cluster) applyYAML(doc string) (string, error) {
	cl.t.Helper()
	path := filepath.Join(cl.t.TempDir(), "qv.yaml")
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		cl.t.Fatal(err)
	}
	return cl.tryKubectl("apply", "-f", path)
}

func (cl *cluster) get(name string) *v1alpha1.QuorumVolume { return qvtest.Get(cl.t, cl.c, name) }

// waitFor polls volume name until ok holds, and fails with its last
// state after timeout.
func (cl *cluster) waitFor(name, what string, ok func(*v1alpha1.QuorumVolume) bool) *v1alpha1.QuorumVolume {
	cl.t.Helper()
	return qvtest.WaitFor(cl.t, cl.c, name, what, timeout, ok)
}

func (cl *cluster) poll(what string, ok func() bool) {
	cl.t.Helper()
	err := wait.PollUntilContextTimeout(cl.t.Context(), 100*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		return ok(), nil
	})
	if err != nil {
		cl.t.Fatalf("waiting for %s: %v", what, err)
	}
}

func replicaOn(qv *v1alpha1.QuorumVolume, node string) v1alpha1.ReplicaStatus {
	for _, r := range qv.Status.Replicas {
		if r.Node == node {
			return r
		}
	}
	return v1alpha1.ReplicaStatus{}
}

// image is the path of a's image of the volume's replica on its node.
func image(a *nodeAgent, qv *v1alpha1.QuorumVolume) string {
	return filepath.Join(a.dataDir, qv.Name, replicaOn(qv, a.node).Name+".img")
}

// uris are the NBD URIs of the volume's replicas from the endpoints in its
// status, the one on node first, as the CSI node would assemble them
// (its own replica first).
func (cl *cluster) uris(qv *v1alpha1.QuorumVolume, node string) []string {
	reps := slices.Clone(qv.Status.Replicas)
	slices.SortStableFunc(reps, func(a, b v1alpha1.ReplicaStatus) int {
		switch {
		case a.Node == node:
			return -1
		case b.Node == node:
			return 1
		}
		return 0
	})
	var uris []string
	for _, r := range reps {
		uris = append(uris, fmt.Sprintf("nbds://%s/%s?tls-certificates=%s", r.Endpoint, qv.Name, cl.tlsDir))
	}
	return uris
}

func (cl *cluster) open(qv *v1alpha1.QuorumVolume, node string, epoch int64) (*volume.Volume, error) {
	return volume.Open(cl.t.Context(), cl.uris(qv, node), volume.Options{
		Epoch: uint64(epoch),
		// A stopped replica server must fail requests quickly, not after
		// the default 30 s.
		RequestTimeout: 3 * time.Second,
		Logger:         kubetest.Slog(cl.t).With("volume", qv.Name),
	})
}

// columns maps the headers of kubectl's table output to the cells of its
// single row. Cells are cut at the headers' offsets, since an empty cell
// would shift a split by whitespace.
func columns(t *testing.T, out string) map[string]string {
	t.Helper()
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("kubectl printed %d lines, want a header and one row:\n%s", len(lines), out)
	}
	header, row := lines[0], lines[1]
	var starts []int
	for i := range header {
		if header[i] != ' ' && (i == 0 || header[i-1] == ' ') {
			starts = append(starts, i)
		}
	}
	cells := map[string]string{}
	for k, s := range starts {
		end := len(header)
		if k+1 < len(starts) {
			end = starts[k+1]
		}
		cell := ""
		if s < len(row) {
			cell = row[s:min(end, len(row))]
		}
		cells[strings.TrimSpace(header[s:end])] = strings.TrimSpace(cell)
	}
	return cells
}

// waitEvent waits for an Event of type and reason about volume whose note
// contains text.
func (cl *cluster) waitEvent(volume, eventType, reason, text string) {
	cl.t.Helper()
	var seen []string
	err := wait.PollUntilContextTimeout(cl.t.Context(), 100*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		var list eventsv1.EventList
		if err := cl.c.List(ctx, &list); err != nil {
			return false, err
		}
		seen = seen[:0]
		for _, ev := range list.Items {
			if ev.Regarding.Kind != "QuorumVolume" || ev.Regarding.Name != volume {
				continue
			}
			seen = append(seen, ev.Type+" "+ev.Reason+": "+ev.Note)
			if ev.Type == eventType && ev.Reason == reason && strings.Contains(ev.Note, text) {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		cl.t.Fatalf("no %s Event %s %q about %s: %v; its Events:\n%s", eventType, reason, text, volume, err, strings.Join(seen, "\n"))
	}
}

// lease is node's agent Lease.
func (cl *cluster) lease(node string) *coordinationv1.Lease {
	cl.t.Helper()
	l := &coordinationv1.Lease{}
	if err := cl.c.Get(cl.t.Context(), client.ObjectKey{Namespace: contract.DefaultNamespace, Name: contract.LeaseName(node)}, l); err != nil {
		cl.t.Fatalf("lease of %s: %v", node, err)
	}
	return l
}

// files lists every file left in a's data folder.
func files(t *testing.T, a *nodeAgent) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(a.dataDir, func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			out = append(out, path)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// checkStopped fails the test when anything still accepts connections on
// a's NBD address after its agent stopped.
func checkStopped(t *testing.T, a *nodeAgent) {
	t.Helper()
	if c, err := net.DialTimeout("tcp", a.listen, time.Second); err == nil {
		c.Close()
		t.Errorf("%s still accepts connections on %s after its agent stopped", a.node, a.listen)
	}
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// block is 4 KiB of a pattern that differs per write.
func block(i int) []byte {
	return bytes.Repeat([]byte(fmt.Sprintf("write %6d of the control plane test\n", i)), 4096/39+1)[:4096]
}

// TestControlPlane is issue 5's integration: a QuorumVolume applied with
// kubectl is placed by the controller, created and served by three node
// agents, attached and written to over NBD, survives an agent's outage
// (Degraded, then Ready again after resync) and is deleted with all its
// files.
func TestControlPlane(t *testing.T) {
	cl := startCluster(t)
	ctx := t.Context()
	a1, a3 := cl.agents[0], cl.agents[2]

	// 1. Apply: three images, one per agent, and phase Ready.
	if _, err := cl.applyYAML("apiVersion: quorum.csi.dev/v1alpha1\nkind: QuorumVolume\nmetadata:\n  name: vol1\nspec:\n  size: 64Mi\n  replicas: 3\n"); err != nil {
		t.Fatal(err)
	}
	qv := cl.waitFor("vol1", "phase Ready", qvtest.Ready)
	metas := map[string]replica.Meta{}
	for _, a := range cl.agents {
		rep := replicaOn(qv, a.node)
		m, err := replica.ReadMeta(image(a, qv))
		if err != nil {
			t.Fatalf("replica on %s: %v", a.node, err)
		}
		if m.VolumeID != string(qv.UID) || m.ReplicaID != rep.Name || m.Size != 64*mib {
			t.Errorf("image on %s: %+v, want volume %s replica %s size %d", a.node, m, qv.UID, rep.Name, 64*mib)
		}
		if rep.Endpoint != a.listen {
			t.Errorf("replica on %s has endpoint %s, want %s", a.node, rep.Endpoint, a.listen)
		}
		metas[a.node] = m
	}
	row := columns(t, cl.kubectl("get", "qv", "vol1"))
	for col, want := range map[string]string{"NAME": "vol1", "SIZE": "64Mi", "READY": "3/3", "PATTERN": "fifo", "ACTIVE": "", "STANDBY": "", "PHASE": "Ready"} {
		if row[col] != want {
			t.Errorf("kubectl get qv: %s is %q, want %q (%v)", col, row[col], want, row)
		}
	}

	// 2. Invalid objects: refused by the API server with a clear message.
	for _, tt := range []struct{ name, spec, want string }{
		{"threshold above replicas", "{size: 64Mi, replicas: 3, voteThreshold: 4}", "voteThreshold must not exceed replicas"},
		{"unknown read pattern", "{size: 64Mi, replicas: 3, readPattern: random}", `spec.readPattern: Unsupported value: "random": supported values: "fifo", "quorum"`},
		{"rewrite without voting", "{size: 64Mi, replicas: 3, rewriteCorrupted: true}", "rewriteCorrupted needs readPattern quorum"},
		{"no replicas", "{size: 64Mi, replicas: 0}", "spec.replicas: Invalid value: 0: spec.replicas in body should be greater than or equal to 1"},
		{"zero size", "{size: 0, replicas: 3}", "size must be greater than zero"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := cl.applyYAML(fmt.Sprintf("apiVersion: quorum.csi.dev/v1alpha1\nkind: QuorumVolume\nmetadata: {name: invalid}\nspec: %s\n", tt.spec))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("kubectl apply of %s: %v; want a refusal saying %q", tt.spec, err, tt.want)
			}
		})
	}
	if err := cl.c.Get(ctx, client.ObjectKey{Name: "invalid"}, &v1alpha1.QuorumVolume{}); !apierrors.IsNotFound(err) {
		t.Errorf("a refused object exists: %v", err)
	}

	// 3. Attach to n1 as ControllerPublish does, and open the volume over
	// the three replica servers as NodeStage does.
	att, err := contract.Attach(ctx, cl.c, contract.NewEventRecorder(cl.c, contract.ControllerFieldManager, "test"), "vol1", a1.node, false)
	if err != nil {
		t.Fatal(err)
	}
	epoch := att.Epoch
	if epoch != 1 {
		t.Errorf("first attach got epoch %d, want 1", epoch)
	}
	if row := columns(t, cl.kubectl("get", "qv", "vol1")); row["ACTIVE"] != a1.node || row["STANDBY"] != "" {
		t.Errorf("kubectl get qv: ACTIVE %q, STANDBY %q, want %s and none", row["ACTIVE"], row["STANDBY"], a1.node)
	}
	v, err := cl.open(qv, a1.node, epoch)
	if err != nil {
		t.Fatalf("open with epoch %d: %v", epoch, err)
	}
	written := map[int64][]byte{} // offset -> what the volume holds there
	write := func(i int) {
		t.Helper()
		off := int64(i%(64*mib/4096)) * 4096
		b := block(i)
		if err := v.WriteAt(ctx, b, off); err != nil {
			t.Fatalf("write %d at %d: %v", i, off, err)
		}
		written[off] = b
	}
	n := 0
	for ; n < 64; n++ {
		write(n * 257)
	}

	// 4. Agent 3 stops: after its Lease expires its replica is Faulty and
	// the volume Degraded, while writes go on with two replicas.
	cl.stop(a3)
	checkStopped(t, a3)
	qv = cl.waitFor("vol1", "phase Degraded", func(qv *v1alpha1.QuorumVolume) bool {
		write(n * 257)
		n++
		return qv.Status.Phase == v1alpha1.VolumeDegraded
	})
	if r := replicaOn(qv, a3.node); r.State != v1alpha1.ReplicaFaulty || r.Message != "node agent on n3 not renewing its lease" {
		t.Errorf("replica on n3: %s %q, want Faulty because of the lease", r.State, r.Message)
	}
	if qv.Status.Ready != "2/3" {
		t.Errorf("status.ready %q, want 2/3", qv.Status.Ready)
	}
	cl.waitEvent("vol1", corev1.EventTypeWarning, string(v1alpha1.VolumeDegraded), "")
	third := cl.uris(qv, a1.node)[2]
	if st := childState(v, third); st.State != quorum.ChildFaulty || st.DirtyBytes == 0 {
		t.Errorf("engine's child for n3 after writes without it: %+v, want faulty with dirty regions", st)
	}

	// 5. Agent 3 comes back on the same folder and address: it takes its
	// expired Lease over as contract.RenewLease does, serves the same
	// image, reports it Healthy, the engine resyncs it, and the volume is
	// Ready again.
	expired := cl.lease(a3.node)
	cl.start(a3)
	cl.poll("n3's replica back in the engine", func() bool {
		v.Probe(ctx)
		st := childState(v, third)
		return st.State == quorum.ChildHealthy && st.DirtyBytes == 0
	})
	cl.waitFor("vol1", "phase Ready again", qvtest.Ready)
	if l := cl.lease(a3.node); ptr.Deref(l.Spec.HolderIdentity, "") != a3.node || !l.Spec.AcquireTime.After(expired.Spec.RenewTime.Time) ||
		ptr.Deref(l.Spec.LeaseTransitions, 0) != ptr.Deref(expired.Spec.LeaseTransitions, 0)+1 {
		t.Errorf("n3's Lease after the restart: %+v; want it taken over after its expiry (renewed %v): acquired anew, one more transition", l.Spec, expired.Spec.RenewTime)
	}
	if m, err := replica.ReadMeta(image(a3, qv)); err != nil || !m.SameReplica(metas[a3.node]) {
		t.Errorf("n3's image after the restart: %+v, %v; want the same replica as %+v", m, err, metas[a3.node])
	}
	for range 16 {
		write(n * 257)
		n++
	}

	// 6. Close and detach; the three images are byte for byte the same
	// (quorumctl check: compared offline, with the agents stopped).
	if err := v.Close(ctx); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := contract.Detach(ctx, cl.c, contract.NewEventRecorder(cl.c, contract.ControllerFieldManager, "test"), "vol1", a1.node); err != nil {
		t.Fatal(err)
	}
	if qv = cl.get("vol1"); len(qv.Status.Attachments) != 0 || qv.Status.Epoch != epoch {
		t.Errorf("after detach: attachments %v, epoch %d; want none and epoch %d", qv.Status.Attachments, qv.Status.Epoch, epoch)
	}
	var paths []string
	for _, a := range cl.agents {
		cl.stop(a)
		checkStopped(t, a)
		paths = append(paths, image(a, qv))
	}
	var diffs []volume.Diff
	if err := volume.Compare(ctx, paths, func(d volume.Diff) { diffs = append(diffs, d) }); err != nil {
		t.Fatalf("compare: %v", err)
	}
	if len(diffs) > 0 {
		t.Errorf("replicas differ: %+v", diffs)
	}
	checkContent(t, paths[0], written)

	// 7. Delete with kubectl (it waits for the finalizer): every file of
	// the volume goes from every data folder.
	for _, a := range cl.agents {
		cl.start(a)
	}
	cl.kubectl("delete", "qv", "vol1", "--timeout=60s")
	if err := cl.c.Get(ctx, client.ObjectKey{Name: "vol1"}, &v1alpha1.QuorumVolume{}); !apierrors.IsNotFound(err) {
		t.Errorf("vol1 after kubectl delete: %v, want not found", err)
	}
	for _, a := range cl.agents {
		if left := files(t, a); len(left) > 0 {
			t.Errorf("%s kept files of the deleted volume: %v", a.node, left)
		}
	}
	for _, a := range cl.agents {
		cl.stop(a)
		checkStopped(t, a)
	}
}

// childState is the engine's view of the child at uri.
func childState(v *volume.Volume, uri string) quorum.ChildStatus {
	for _, st := range v.Status() {
		if st.Name == uri {
			return st
		}
	}
	return quorum.ChildStatus{}
}

// checkContent reads the image at path and compares it with what was
// written, by offset.
func checkContent(t *testing.T, path string, written map[int64][]byte) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, 4096)
	for off, want := range written {
		if _, err := f.ReadAt(got, off); err != nil {
			t.Fatalf("read %s at %d: %v", path, off, err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s at %d holds %q..., want %q...", path, off, got[:32], want[:32])
		}
	}
}

// TestStaleEpochRefused: once the attachment moved from n1 to n2, the
// replica servers refuse n1's epoch, for new connections and for the
// connections n1 still has.
func TestStaleEpochRefused(t *testing.T) {
	cl := startCluster(t)
	ctx := t.Context()
	qv := &v1alpha1.QuorumVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "moved"},
		Spec:       v1alpha1.QuorumVolumeSpec{Size: resource.MustParse("16Mi"), Replicas: 3},
	}
	if err := cl.c.Create(ctx, qv); err != nil {
		t.Fatal(err)
	}
	qv = cl.waitFor("moved", "phase Ready", qvtest.Ready)
	a, b := cl.agents[0].node, cl.agents[1].node

	attA, err := contract.Attach(ctx, cl.c, contract.NewEventRecorder(cl.c, contract.ControllerFieldManager, "test"), qv.Name, a, false)
	if err != nil {
		t.Fatal(err)
	}
	epochA := attA.Epoch
	va, err := cl.open(qv, a, epochA)
	if err != nil {
		t.Fatalf("open on %s with epoch %d: %v", a, epochA, err)
	}
	if err := va.WriteAt(ctx, block(1), 0); err != nil {
		t.Fatalf("write on %s: %v", a, err)
	}
	if _, err := contract.Attach(ctx, cl.c, contract.NewEventRecorder(cl.c, contract.ControllerFieldManager, "test"), qv.Name, b, false); !errors.Is(err, contract.ErrAttachedElsewhere) {
		t.Fatalf("attach to %s while attached to %s: %v, want ErrAttachedElsewhere", b, a, err)
	}
	// n1 is detached without closing the volume first, as when its node
	// is unreachable: only the epoch keeps it from writing on.
	if err := contract.Detach(ctx, cl.c, contract.NewEventRecorder(cl.c, contract.ControllerFieldManager, "test"), qv.Name, a); err != nil {
		t.Fatal(err)
	}
	attB, err := contract.Attach(ctx, cl.c, contract.NewEventRecorder(cl.c, contract.ControllerFieldManager, "test"), qv.Name, b, false)
	if err != nil {
		t.Fatal(err)
	}
	epochB := attB.Epoch
	if epochB <= epochA {
		t.Fatalf("attach after moving got epoch %d, not newer than %d", epochB, epochA)
	}
	vb, err := cl.open(qv, b, epochB)
	if err != nil {
		t.Fatalf("open on %s with epoch %d: %v", b, epochB, err)
	}
	if err := vb.WriteAt(ctx, block(2), 0); err != nil {
		t.Fatalf("write on %s: %v", b, err)
	}

	_, err = volume.Open(ctx, cl.uris(qv, a), volume.Options{Epoch: uint64(epochA), Logger: discard()})
	if !errors.Is(err, nbd.ErrFenced) {
		t.Errorf("open with epoch %d after epoch %d took over: %v, want %v", epochA, epochB, err, nbd.ErrFenced)
	}
	if err := va.WriteAt(ctx, block(3), 0); err == nil {
		t.Errorf("the old holder's write with epoch %d succeeded after epoch %d took over", epochA, epochB)
	}
	// The fenced volume cannot record a clean close on any replica; its
	// Close error says so and is expected.
	if err := va.Close(ctx); err == nil {
		t.Errorf("closing the fenced volume reported success")
	}
	if err := vb.Close(ctx); err != nil {
		t.Fatalf("close on %s: %v", b, err)
	}
	got := make([]byte, 4096)
	vc, err := cl.open(qv, b, epochB)
	if err != nil {
		t.Fatal(err)
	}
	if err := vc.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, block(2)) {
		t.Errorf("read back on %s: %v; holds the new holder's write: %v", b, err, bytes.Equal(got, block(2)))
	}
	if err := vc.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := contract.Detach(ctx, cl.c, contract.NewEventRecorder(cl.c, contract.ControllerFieldManager, "test"), qv.Name, b); err != nil {
		t.Fatal(err)
	}
	for _, ag := range cl.agents {
		cl.stop(ag)
		checkStopped(t, ag)
	}
}

// TestNodeGone: a Node deleted while its agent still runs (a node being
// decommissioned) makes its replica Stale, and the agent leaves that
// verdict alone instead of reporting the replica Healthy over it again
// and again.
func TestNodeGone(t *testing.T) {
	cl := startCluster(t)
	ctx := t.Context()
	qv := &v1alpha1.QuorumVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "gone"},
		Spec:       v1alpha1.QuorumVolumeSpec{Size: resource.MustParse("16Mi"), Replicas: 3},
	}
	if err := cl.c.Create(ctx, qv); err != nil {
		t.Fatal(err)
	}
	qv = cl.waitFor("gone", "phase Ready", qvtest.Ready)
	a3 := cl.agents[2]
	img := image(a3, qv)
	if err := cl.c.Delete(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: a3.node}}); err != nil {
		t.Fatal(err)
	}
	qv = cl.waitFor("gone", "n3's replica Stale", func(qv *v1alpha1.QuorumVolume) bool {
		return replicaOn(qv, a3.node).State == v1alpha1.ReplicaStale
	})
	// Steady: the object does not change any more while n3's agent runs
	// (it renews its Lease several times meanwhile).
	time.Sleep(4 * renewInterval)
	last := qv.ResourceVersion
	steady := cl.waitFor("gone", "a steady status", func(now *v1alpha1.QuorumVolume) bool {
		same := now.ResourceVersion == last
		last = now.ResourceVersion
		return same
	})
	time.Sleep(2 * time.Second)
	if now := cl.get("gone"); now.ResourceVersion != steady.ResourceVersion {
		b, _ := yaml.Marshal(now.Status)
		t.Errorf("the status keeps changing after n3's Node was deleted (resourceVersion %s, then %s):\n%s", steady.ResourceVersion, now.ResourceVersion, b)
	}
	if r := replicaOn(steady, a3.node); r.State != v1alpha1.ReplicaStale || r.Message != "node n3 is gone" || r.Endpoint != "" {
		t.Errorf("n3's replica: %+v; want Stale, the controller's message and no endpoint", r)
	}
	if steady.Status.Phase != v1alpha1.VolumeDegraded {
		t.Errorf("phase %s, want Degraded", steady.Status.Phase)
	}
	if n := cl.countEvents("gone", "ReplicaStale"); n != 1 {
		t.Errorf("%d ReplicaStale Events, want 1", n)
	}
	// Without a fourth node nothing replaces it, so its image is kept.
	if _, err := replica.ReadMeta(img); err != nil {
		t.Errorf("n3's image of the Stale replica: %v", err)
	}
}

// countEvents counts the Events about volume with reason; a series (the
// recorder folds repeats of one Event into it) counts as its count.
func (cl *cluster) countEvents(volume, reason string) int {
	cl.t.Helper()
	var list eventsv1.EventList
	if err := cl.c.List(cl.t.Context(), &list); err != nil {
		cl.t.Fatal(err)
	}
	n := 0
	for _, ev := range list.Items {
		if ev.Regarding.Kind == "QuorumVolume" && ev.Regarding.Name == volume && ev.Reason == reason {
			n += max(1, int(ptr.Deref(ev.Series, eventsv1.EventSeries{}).Count))
		}
	}
	return n
}
