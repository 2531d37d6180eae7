package agent_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/nbd"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// controllerManager is the field manager the test writes the status with,
// standing in for the controller.
const controllerManager = "test-controller"

const (
	mib       = 1 << 20
	namespace = agent.DefaultNamespace
	finalizer = "quorum.csi.dev/replicas"
	timeout   = 60 * time.Second
)

// testAgent is one node agent running in the test process.
type testAgent struct {
	node, ip, dataDir, metrics string
	run                        *kubetest.Agent
}

// env is the API server, a client, and the agents.
type env struct {
	t      *testing.T
	rc     *rest.Config
	c      client.Client
	tlsDir string
	agents map[string]*testAgent
}

// TestAgents runs three node agents against a real API server, with the
// test playing the controller: placement, status, leases, the data path
// through the agents' NBD servers (TLS, fencing), restart, growth,
// removal of a replaced replica, deletion, and the refusals.
func TestAgents(t *testing.T) {
	srv, c := qvtest.Start(t)
	e := &env{t: t, rc: srv.Config, c: c, agents: map[string]*testAgent{}}
	ctx := t.Context()
	e.tlsDir = t.TempDir()
	ips := map[string]string{"n1": "127.0.0.2", "n2": "127.0.0.3", "n3": "127.0.0.4"}
	if err := nbd.GenerateDevCA(e.tlsDir, []string{"127.0.0.2", "127.0.0.3", "127.0.0.4"}); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"n1", "n2", "n3"} {
		if err := e.c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n, Labels: map[string]string{"kubernetes.io/hostname": n}}}); err != nil {
			t.Fatal(err)
		}
		e.start(n, ips[n], t.TempDir(), ips[n]+":0")
	}

	qv := e.createVolume("vol1", 16*mib)
	e.place(qv.Name, map[string]string{"r1": "n1", "r2": "n2", "r3": "n3"})
	qv = e.waitReplicas(qv.Name, "all replicas healthy", func(rs map[string]v1alpha1.ReplicaStatus) bool {
		return len(rs) == 3 && allHealthy(rs)
	})
	endpoints := map[string]string{} // by node; a restart keeps its listen address
	for _, r := range qv.Status.Replicas {
		endpoints[r.Node] = r.Endpoint
	}

	t.Run("images", func(t *testing.T) {
		for rep, node := range map[string]string{"r1": "n1", "r2": "n2", "r3": "n3"} {
			m, err := replica.ReadMeta(e.image(node, "vol1", rep))
			if err != nil {
				t.Fatal(err)
			}
			if m.VolumeID != string(qv.UID) || m.ReplicaID != rep || m.Size != 16*mib {
				t.Errorf("%s on %s: metadata %+v, want volume %s replica %s size %d", rep, node, m, qv.UID, rep, 16*mib)
			}
		}
	})
	t.Run("status ownership", func(t *testing.T) { e.checkOwnership(qv.Name) })
	t.Run("leases", func(t *testing.T) {
		for node := range e.agents {
			first := e.lease(node)
			if first.Spec.HolderIdentity == nil || *first.Spec.HolderIdentity != node || *first.Spec.LeaseDurationSeconds != 3 {
				t.Fatalf("lease of %s: %+v", node, first.Spec)
			}
			e.poll("lease of "+node+" renewed", func() bool {
				return e.lease(node).Spec.RenewTime.After(first.Spec.RenewTime.Time)
			})
		}
	})

	data := bytes.Repeat([]byte("quorum-agent"), 4096/12+1)[:4096]
	t.Run("data path", func(t *testing.T) {
		v := e.open(qv.Name, 1)
		for _, off := range []int64{0, 5 * mib, 16*mib - 4096} {
			if err := v.WriteAt(ctx, data, off); err != nil {
				t.Fatal(err)
			}
		}
		if err := v.Close(ctx); err != nil {
			t.Fatal(err)
		}
		e.checkIdentical(qv.Name)
	})
	t.Run("metrics", func(t *testing.T) {
		body := e.scrape("n1")
		for _, want := range []string{
			"quorum_agent_replicas_served 1",
			`quorum_agent_replica_bytes_total{op="write",volume="vol1"} 12288`,
			`quorum_agent_replica_requests_total{op="flush",volume="vol1"}`,
			// Error counters exist at 0 from the start, for rates.
			`quorum_agent_replica_io_errors_total{op="write",volume="vol1"} 0`,
			`quorum_agent_replica_failures_total{action="serve",volume="vol1"} 0`,
			"controller_runtime_reconcile_total",
		} {
			if !strings.Contains(body, want) {
				t.Errorf("metrics of n1 lack %q:\n%s", want, body)
			}
		}
	})
	t.Run("fencing", func(t *testing.T) {
		v := e.open(qv.Name, 2)
		if err := v.Close(ctx); err != nil {
			t.Fatal(err)
		}
		_, err := volume.Open(ctx, e.uris(qv.Name), volume.Options{Epoch: 1, Logger: discard()})
		if !errors.Is(err, nbd.ErrFenced) {
			t.Fatalf("open with epoch 1 after epoch 2: %v, want ErrFenced", err)
		}
	})

	t.Run("stop and restart", func(t *testing.T) {
		a := e.agents["n2"]
		ep := e.endpoint(qv.Name, "r2")
		meta, err := replica.ReadMeta(e.image("n2", "vol1", "r2"))
		if err != nil {
			t.Fatal(err)
		}
		e.stop("n2")
		if c, err := net.DialTimeout("tcp", ep, time.Second); err == nil {
			c.Close()
			t.Fatalf("stopped agent's endpoint %s still accepts connections", ep)
		}
		stopped := e.lease("n2").Spec.RenewTime
		time.Sleep(3 * a.run.Config.RenewInterval)
		if now := e.lease("n2").Spec.RenewTime; !now.Equal(stopped) {
			t.Fatalf("stopped agent's lease renewed: %v after %v", now, stopped)
		}
		// The controller marks the replica of an expired lease Faulty.
		e.mark(qv.Name, "r2", v1alpha1.ReplicaFaulty, "node agent on n2 not renewing its lease")
		e.start("n2", a.ip, a.dataDir, ep)
		e.waitReplicas(qv.Name, "r2 healthy again", func(rs map[string]v1alpha1.ReplicaStatus) bool {
			return rs["r2"].State == v1alpha1.ReplicaHealthy && rs["r2"].Endpoint == ep
		})
		again, err := replica.ReadMeta(e.image("n2", "vol1", "r2"))
		if err != nil {
			t.Fatal(err)
		}
		if !again.SameReplica(meta) {
			t.Fatalf("restart made a new image: %+v, was %+v", again, meta)
		}
		v := e.open(qv.Name, 3)
		got := make([]byte, len(data))
		if err := v.ReadAt(ctx, got, 5*mib); err != nil || !bytes.Equal(got, data) {
			t.Errorf("read after restart: %v, data equal %v", err, bytes.Equal(got, data))
		}
		if err := v.Close(ctx); err != nil {
			t.Fatal(err)
		}
	})

	// The controller shows a served replica Resyncing while the attached
	// engine reports bytes it misses; the agent keeps its own fields
	// (message, endpoint) but leaves that state alone until the
	// controller turns it Healthy again. The message the agent writes
	// back over the test's shows that it reconciled meanwhile.
	t.Run("resyncing is the controller's word", func(t *testing.T) {
		ep := e.endpoint(qv.Name, "r2")
		for _, state := range []v1alpha1.ReplicaState{v1alpha1.ReplicaResyncing, v1alpha1.ReplicaHealthy} {
			e.mark(qv.Name, "r2", state, "set by the test")
			var r v1alpha1.ReplicaStatus
			e.waitReplicas(qv.Name, "the agent's message on r2 again", func(rs map[string]v1alpha1.ReplicaStatus) bool {
				r = rs["r2"]
				return strings.HasPrefix(r.Message, "served at")
			})
			if r.State != state || r.Endpoint != ep {
				t.Errorf("marked %s, the agent then reported state %s with endpoint %q; want %s at %s", state, r.State, r.Endpoint, state, ep)
			}
		}
	})

	t.Run("growth", func(t *testing.T) {
		e.patchSize(qv.Name, "32Mi")
		e.waitReplicas(qv.Name, "replicas grown", func(rs map[string]v1alpha1.ReplicaStatus) bool {
			for _, r := range rs {
				if r.State != v1alpha1.ReplicaHealthy || !strings.Contains(r.Message, fmt.Sprint(32*mib)) {
					return false
				}
			}
			return true
		})
		for rep, node := range map[string]string{"r1": "n1", "r2": "n2", "r3": "n3"} {
			st, err := os.Stat(e.image(node, "vol1", rep))
			if err != nil || st.Size() != 32*mib {
				t.Fatalf("%s: %v, size %d, want %d", rep, err, st.Size(), 32*mib)
			}
		}
		v := e.open(qv.Name, 4)
		got := make([]byte, len(data))
		if v.Size() != 32*mib {
			t.Errorf("grown volume has %d bytes", v.Size())
		}
		if err := v.ReadAt(ctx, got, 16*mib-4096); err != nil || !bytes.Equal(got, data) {
			t.Errorf("read after growth: %v, data equal %v", err, bytes.Equal(got, data))
		}
		if err := v.WriteAt(ctx, data, 32*mib-4096); err != nil {
			t.Errorf("write to the grown part: %v", err)
		}
		if err := v.Close(ctx); err != nil {
			t.Fatal(err)
		}
		e.checkIdentical(qv.Name)
	})

	t.Run("replica removed", func(t *testing.T) {
		e.place(qv.Name, map[string]string{"r1": "n1", "r2": "n2"})
		e.waitReplicas(qv.Name, "r3 gone", func(rs map[string]v1alpha1.ReplicaStatus) bool {
			_, ok := rs["r3"]
			return !ok && len(rs) == 2
		})
		e.poll("r3's files deleted", func() bool { return e.files("n3", "vol1") == "" })
	})

	t.Run("refusals", func(t *testing.T) {
		// An image with other ids is in the way: Faulty, and kept.
		other := e.image("n3", "vol2", "r1")
		if err := os.MkdirAll(filepath.Dir(other), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := replica.CreateWithID(other, 4*mib, "someone-else", "r1"); err != nil {
			t.Fatal(err)
		}
		vol2 := e.createVolume("vol2", 4*mib)
		e.place(vol2.Name, map[string]string{"r1": "n3"})
		// A size that is no multiple of 4096 cannot be made.
		vol3 := e.createVolume("vol3", 1000000)
		e.place(vol3.Name, map[string]string{"r1": "n1"})
		for vol, want := range map[string]string{"vol2": "someone-else", "vol3": "multiple of 4096"} {
			e.waitReplicas(vol, vol+" faulty", func(rs map[string]v1alpha1.ReplicaStatus) bool {
				return rs["r1"].State == v1alpha1.ReplicaFaulty && strings.Contains(rs["r1"].Message, want)
			})
		}
		if m, err := replica.ReadMeta(other); err != nil || m.VolumeID != "someone-else" {
			t.Fatalf("image in the way changed: %+v, %v", m, err)
		}
		e.deleteVolume(vol2.Name)
		e.deleteVolume(vol3.Name)
		if _, err := replica.ReadMeta(other); err != nil {
			t.Fatalf("deleting vol2 deleted an image that was not its own: %v", err)
		}
	})

	t.Run("deletion", func(t *testing.T) {
		e.deleteVolume(qv.Name)
		for node := range e.agents {
			if f := e.files(node, "vol1"); f != "" {
				t.Errorf("%s kept files of the deleted volume: %s", node, f)
			}
		}
	})

	// Nothing is left listening once the agents stopped.
	for node, a := range e.agents {
		e.stop(node)
		for _, addr := range []string{a.metrics, endpoints[node]} {
			if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
				c.Close()
				t.Errorf("%s still accepts connections on %s after it stopped", node, addr)
			}
		}
	}
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// start runs an agent for node, serving on listen (ip:0 for a free port).
func (e *env) start(node, ip, dataDir, listen string) {
	e.t.Helper()
	a := &testAgent{node: node, ip: ip, dataDir: dataDir}
	if old, ok := e.agents[node]; ok {
		a.metrics = old.metrics
	} else {
		a.metrics = kubetest.FreeAddr(e.t, ip)
	}
	tlsCfg, err := nbd.ServerTLSDir(e.tlsDir)
	if err != nil {
		e.t.Fatal(err)
	}
	a.run = kubetest.StartAgent(e.t, e.rc, agent.Config{
		Node: node, DataDir: dataDir, Listen: listen, AdvertiseAddress: ip, TLS: tlsCfg,
		MetricsAddress: a.metrics,
	})
	e.agents[node] = a
}

// stop cancels an agent and waits for it; Run must return cleanly.
func (e *env) stop(node string) { e.agents[node].run.Stop() }

func (e *env) createVolume(name string, size int64) *v1alpha1.QuorumVolume {
	e.t.Helper()
	qv := &v1alpha1.QuorumVolume{
		ObjectMeta: metav1.ObjectMeta{Name: name, Finalizers: []string{finalizer}},
		Spec:       v1alpha1.QuorumVolumeSpec{Size: *resource.NewQuantity(size, resource.BinarySI), Replicas: 3},
	}
	if err := e.c.Create(e.t.Context(), qv); err != nil {
		e.t.Fatal(err)
	}
	return qv
}

// place writes the controller's placement as the controller does, by
// read-modify-write of the status (Status().Update) under its own field
// manager: new entries {name, node, state Creating}, placed ones kept as
// they are, others removed (as the controller removes a replaced
// replica).
func (e *env) place(vol string, placement map[string]string) {
	e.t.Helper()
	e.updateStatus(vol, func(st *v1alpha1.QuorumVolumeStatus) {
		var next []v1alpha1.ReplicaStatus
		for _, r := range st.Replicas {
			if _, ok := placement[r.Name]; ok {
				next = append(next, r)
			}
		}
		for rep, node := range placement {
			if !slices.ContainsFunc(next, func(r v1alpha1.ReplicaStatus) bool { return r.Name == rep }) {
				next = append(next, v1alpha1.ReplicaStatus{Name: rep, Node: node, State: v1alpha1.ReplicaCreating, LastTransitionTime: metav1.Now()})
			}
		}
		st.Replicas = next
		if st.Phase == "" {
			st.Phase = v1alpha1.VolumePending
		}
	})
}

// mark sets a replica's state as the controller does when its node's
// lease expired.
func (e *env) mark(vol, rep string, state v1alpha1.ReplicaState, msg string) {
	e.t.Helper()
	e.updateStatus(vol, func(st *v1alpha1.QuorumVolumeStatus) {
		for i := range st.Replicas {
			if st.Replicas[i].Name == rep {
				st.Replicas[i].State, st.Replicas[i].Message, st.Replicas[i].LastTransitionTime = state, msg, metav1.Now()
			}
		}
	})
}

func (e *env) updateStatus(vol string, fn func(*v1alpha1.QuorumVolumeStatus)) {
	e.t.Helper()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		qv := e.get(vol)
		fn(&qv.Status)
		return e.c.Status().Update(e.t.Context(), qv, client.FieldOwner(controllerManager))
	})
	if err != nil {
		e.t.Fatalf("update status of %s: %v", vol, err)
	}
}

func (e *env) patchSize(vol, size string) {
	e.t.Helper()
	patch := client.RawPatch(types.MergePatchType, []byte(`{"spec":{"size":"`+size+`"}}`))
	if err := e.c.Patch(e.t.Context(), &v1alpha1.QuorumVolume{ObjectMeta: metav1.ObjectMeta{Name: vol}}, patch); err != nil {
		e.t.Fatal(err)
	}
}

// deleteVolume deletes a volume, waits until the agents withdrew every
// entry (what the controller waits for), and removes the finalizer.
func (e *env) deleteVolume(vol string) {
	e.t.Helper()
	ctx := e.t.Context()
	if err := e.c.Delete(ctx, &v1alpha1.QuorumVolume{ObjectMeta: metav1.ObjectMeta{Name: vol}}); err != nil {
		e.t.Fatal(err)
	}
	e.waitReplicas(vol, "agents withdrew their entries of "+vol, func(rs map[string]v1alpha1.ReplicaStatus) bool { return len(rs) == 0 })
	patch := client.RawPatch(types.MergePatchType, []byte(`{"metadata":{"finalizers":null}}`))
	if err := e.c.Patch(ctx, &v1alpha1.QuorumVolume{ObjectMeta: metav1.ObjectMeta{Name: vol}}, patch); err != nil {
		e.t.Fatal(err)
	}
	e.poll(vol+" gone", func() bool {
		return apierrors.IsNotFound(e.c.Get(ctx, client.ObjectKey{Name: vol}, &v1alpha1.QuorumVolume{}))
	})
}

func (e *env) get(vol string) *v1alpha1.QuorumVolume { return qvtest.Get(e.t, e.c, vol) }

// waitReplicas polls the volume's status until ok holds for its
// replicas, by name.
func (e *env) waitReplicas(vol, what string, ok func(map[string]v1alpha1.ReplicaStatus) bool) *v1alpha1.QuorumVolume {
	e.t.Helper()
	var qv *v1alpha1.QuorumVolume
	e.poll(what, func() bool {
		qv = e.get(vol)
		rs := map[string]v1alpha1.ReplicaStatus{}
		for _, r := range qv.Status.Replicas {
			rs[r.Name] = r
		}
		return ok(rs)
	})
	return qv
}

// poll waits up to timeout for ok.
func (e *env) poll(what string, ok func() bool) {
	e.t.Helper()
	qvtest.Poll(e.t, what, timeout, func(context.Context) bool { return ok() })
}

func allHealthy(rs map[string]v1alpha1.ReplicaStatus) bool {
	for _, r := range rs {
		if r.State != v1alpha1.ReplicaHealthy || r.Endpoint == "" || r.LastTransitionTime.IsZero() {
			return false
		}
	}
	return true
}

func (e *env) lease(node string) *coordinationv1.Lease {
	e.t.Helper()
	l := &coordinationv1.Lease{}
	if err := e.c.Get(e.t.Context(), client.ObjectKey{Namespace: namespace, Name: contract.LeaseName(node)}, l); err != nil {
		e.t.Fatal(err)
	}
	return l
}

func (e *env) image(node, vol, rep string) string {
	return filepath.Join(e.agents[node].dataDir, vol, rep+".img")
}

// files lists what is left of a volume on a node, "" for nothing.
func (e *env) files(node, vol string) string {
	ents, err := os.ReadDir(filepath.Join(e.agents[node].dataDir, vol))
	if errors.Is(err, os.ErrNotExist) {
		return ""
	}
	if err != nil {
		e.t.Fatal(err)
	}
	var names []string
	for _, en := range ents {
		names = append(names, en.Name())
	}
	if len(names) == 0 {
		return "an empty folder"
	}
	return strings.Join(names, " ")
}

func (e *env) endpoint(vol, rep string) string {
	e.t.Helper()
	for _, r := range e.get(vol).Status.Replicas {
		if r.Name == rep {
			return r.Endpoint
		}
	}
	e.t.Fatalf("%s has no replica %s", vol, rep)
	return ""
}

// uris are the NBD URIs of the volume's replicas, from their reported
// endpoints, in name order.
func (e *env) uris(vol string) []string {
	e.t.Helper()
	var uris []string
	for _, r := range e.get(vol).Status.Replicas {
		uris = append(uris, fmt.Sprintf("nbds://%s/%s?tls-certificates=%s", r.Endpoint, vol, e.tlsDir))
	}
	return uris
}

func (e *env) open(vol string, epoch uint64) *volume.Volume {
	e.t.Helper()
	v, err := volume.Open(e.t.Context(), e.uris(vol), volume.Options{Epoch: epoch, Logger: discard()})
	if err != nil {
		e.t.Fatalf("open %s with epoch %d: %v", vol, epoch, err)
	}
	return v
}

// checkIdentical compares the volume's image files, byte for byte.
func (e *env) checkIdentical(vol string) {
	e.t.Helper()
	var first []byte
	for _, r := range e.get(vol).Status.Replicas {
		b, err := os.ReadFile(e.image(r.Node, vol, r.Name))
		if err != nil {
			e.t.Fatal(err)
		}
		if first == nil {
			first = b
		} else if !bytes.Equal(first, b) {
			e.t.Errorf("replica %s differs from the first", r.Name)
		}
	}
}

// checkOwnership checks that each agent's field manager owns only its own
// entries' reported fields, and the controller still owns node.
func (e *env) checkOwnership(vol string) {
	e.t.Helper()
	qv := e.get(vol)
	owned := map[string]string{}
	for _, mf := range qv.ManagedFields {
		if mf.Subresource == "status" && mf.FieldsV1 != nil {
			owned[mf.Manager] = string(mf.FieldsV1.Raw)
		}
	}
	for node, rep := range map[string]string{"n1": "r1", "n2": "r2", "n3": "r3"} {
		f, ok := owned[agent.FieldManager(node)]
		if !ok {
			e.t.Fatalf("no status fields managed by %s: %v", agent.FieldManager(node), owned)
		}
		for _, other := range []string{"r1", "r2", "r3"} {
			has := strings.Contains(f, `"name\":\"`+other+`\"`)
			if has != (other == rep) {
				e.t.Errorf("%s owns fields of %s: %v, want %v (%s)", agent.FieldManager(node), other, has, other == rep, f)
			}
		}
		for _, field := range []string{"f:state", "f:endpoint", "f:message", "f:lastTransitionTime"} {
			if !strings.Contains(f, field) {
				e.t.Errorf("%s does not own %s: %s", agent.FieldManager(node), field, f)
			}
		}
		if strings.Contains(f, "f:node") || strings.Contains(f, "f:phase") {
			e.t.Errorf("%s owns the controller's fields: %s", agent.FieldManager(node), f)
		}
	}
	if c := owned[controllerManager]; strings.Count(c, "f:node") != 3 || !strings.Contains(c, "f:phase") {
		e.t.Errorf("the controller lost fields: %s", c)
	}
	if qv.Status.Phase != v1alpha1.VolumePending {
		e.t.Errorf("phase %q, the controller wrote Pending", qv.Status.Phase)
	}
}

func (e *env) scrape(node string) string {
	e.t.Helper()
	resp, err := http.Get("http://" + e.agents[node].metrics + "/metrics")
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return string(b)
}
