package controller

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// long is a lease duration that outlasts any test.
const long = time.Hour

// TestReconciler runs the controller in-process against a real API
// server. The subtests share it; each one works on its own nodes, kept
// apart from the others' by a nodeSelector on a "group" label.
func TestReconciler(t *testing.T) {
	e, srv := startEnv(t)
	reg := e.startController(srv)

	t.Run("placement", func(t *testing.T) { e.t = t; testPlacement(e, reg) })
	t.Run("insufficient nodes", func(t *testing.T) { e.t = t; testInsufficient(e) })
	t.Run("lease expiry", func(t *testing.T) { e.t = t; testLeaseExpiry(e, reg) })
	t.Run("node deleted", func(t *testing.T) { e.t = t; testNodeDeleted(e) })
	t.Run("finalizer", func(t *testing.T) { e.t = t; testFinalizer(e) })
	t.Run("no rebuild during migration", func(t *testing.T) { e.t = t; testMigrationHoldsRebuild(e) })
	t.Run("resync", func(t *testing.T) { e.t = t; testResync(e, srv) })
}

func group(g string) map[string]string { return map[string]string{"group": g} }

// placedInGroup makes four live nodes g-a to g-d labelled group=g and a
// three-replica volume g placed on them, and waits for its placement.
func (e *env) placedInGroup(g string) *v1alpha1.QuorumVolume {
	e.t.Helper()
	for _, s := range []string{"a", "b", "c", "d"} {
		n := g + "-" + s
		e.node(n, "group", g)
		e.renew(n, long)
	}
	e.createQV(g, 3, v1alpha1.Placement{NodeSelector: group(g)})
	return e.waitFor(g, "three replicas placed", placedAll(3))
}

func placedAll(n int) func(*v1alpha1.QuorumVolume) bool {
	return func(qv *v1alpha1.QuorumVolume) bool { return len(qv.Status.Replicas) == n }
}

func phaseIs(p v1alpha1.VolumePhase) func(*v1alpha1.QuorumVolume) bool {
	return func(qv *v1alpha1.QuorumVolume) bool { return qv.Status.Phase == p }
}

// testPlacement: four live nodes in three zones, three replicas spread by
// zone, the preferred node first although its name sorts last.
func testPlacement(e *env, reg *prometheus.Registry) {
	t := e.t
	for _, n := range [][2]string{{"place-a", "z1"}, {"place-b", "z1"}, {"place-c", "z2"}, {"place-d", "z3"}} {
		e.node(n[0], "group", "place", "zone", n[1])
		e.renew(n[0], long)
	}
	e.createQV("place", 3, v1alpha1.Placement{NodeSelector: group("place"), SpreadKey: "zone", PreferredNode: "place-d"})
	qv := e.waitFor("place", "three replicas placed", placedAll(3))

	// place-d is preferred; place-a and place-b tie (no load) and share z1,
	// so place-a by name, then place-c for z2.
	if got, want := nodesOf(qv), []string{"place-d", "place-a", "place-c"}; !slices.Equal(got, want) {
		t.Errorf("replicas on %v, want %v", got, want)
	}
	for i, r := range qv.Status.Replicas {
		if want := "r" + string(rune('0'+i)); r.Name != want {
			t.Errorf("replica %d named %q, want %q", i, r.Name, want)
		}
		if r.State != v1alpha1.ReplicaCreating || r.LastTransitionTime.IsZero() {
			t.Errorf("replica %s: state %s, lastTransitionTime %v; want Creating with a time", r.Name, r.State, r.LastTransitionTime)
		}
	}
	if !slices.Contains(qv.Finalizers, Finalizer) {
		t.Errorf("finalizers %v, want %s", qv.Finalizers, Finalizer)
	}
	if c := meta.FindStatusCondition(qv.Status.Conditions, ConditionPlaced); c == nil || c.Status != metav1.ConditionTrue {
		t.Errorf("Placed condition %+v, want True", c)
	}
	qv = e.waitFor("place", "phase Pending", phaseIs(v1alpha1.VolumePending))
	if qv.Status.Ready != "0/3" || qv.Status.ObservedGeneration != qv.Generation {
		t.Errorf("ready %q observedGeneration %d (generation %d), want 0/3 and the generation", qv.Status.Ready, qv.Status.ObservedGeneration, qv.Generation)
	}
	e.waitEvent("place", ReasonPlaced, "Normal", "r0 on place-d (zone=z3), r1 on place-a (zone=z1), r2 on place-c (zone=z2)")
	checkManagedBy(t, qv, FieldManager)

	for _, r := range qv.Status.Replicas {
		e.reportHealthy("place", r.Name)
	}
	qv = e.waitFor("place", "phase Ready", phaseIs(v1alpha1.VolumeReady))
	if c := meta.FindStatusCondition(qv.Status.Conditions, ConditionReady); c == nil || c.Status != metav1.ConditionTrue || qv.Status.Ready != "3/3" {
		t.Errorf("Ready condition %+v, ready %q; want True and 3/3", c, qv.Status.Ready)
	}
	if got := gaugeValue(t, reg, "Ready"); got < 1 {
		t.Errorf("quorum_volumes{phase=Ready} = %v, want at least 1", got)
	}
	if got := volumePhases(t, reg, "place"); !slices.Equal(got, []string{"Ready"}) {
		t.Errorf("quorum_volume_phase{volume=place} at 1 for %v, want [Ready] alone", got)
	}
}

// checkManagedBy fails unless manager wrote part of qv's status.
func checkManagedBy(t *testing.T, qv *v1alpha1.QuorumVolume, manager string) {
	t.Helper()
	for _, f := range qv.ManagedFields {
		if f.Manager == manager && f.Subresource == "status" {
			return
		}
	}
	t.Errorf("no status fields managed by %s: %+v", manager, qv.ManagedFields)
}

func gaugeValue(t *testing.T, reg *prometheus.Registry, phase string) float64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != "quorum_volumes" {
			continue
		}
		for _, m := range f.GetMetric() {
			if labelIs(m, "phase", phase) {
				return m.GetGauge().GetValue()
			}
		}
	}
	t.Fatalf("no quorum_volumes{phase=%q} gathered", phase)
	return 0
}

// volumePhases are the phases quorum_volume_phase sets to 1 for volume.
func volumePhases(t *testing.T, reg *prometheus.Registry, volume string) []string {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var phases []string
	for _, f := range fams {
		if f.GetName() != "quorum_volume_phase" {
			continue
		}
		for _, m := range f.GetMetric() {
			if !labelIs(m, "volume", volume) || m.GetGauge().GetValue() != 1 {
				continue
			}
			for _, l := range m.GetLabel() {
				if l.GetName() == "phase" {
					phases = append(phases, l.GetValue())
				}
			}
		}
	}
	return phases
}

// waitLeaseGauge waits until quorum_agent_lease_current{node} is want.
func waitLeaseGauge(e *env, reg *prometheus.Registry, node string, want float64) {
	e.t.Helper()
	var got []float64
	err := wait.PollUntilContextTimeout(e.t.Context(), 50*time.Millisecond, 10*time.Second, true, func(context.Context) (bool, error) {
		fams, err := reg.Gather()
		if err != nil {
			return false, err
		}
		got = nil
		for _, f := range fams {
			if f.GetName() != "quorum_agent_lease_current" {
				continue
			}
			for _, m := range f.GetMetric() {
				if labelIs(m, "node", node) {
					got = append(got, m.GetGauge().GetValue())
				}
			}
		}
		return len(got) == 1 && got[0] == want, nil
	})
	if err != nil {
		e.t.Fatalf("quorum_agent_lease_current{node=%q}: %v, want %v: %v", node, got, want, err)
	}
}

func labelIs(m *dto.Metric, name, value string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == name && l.GetValue() == value {
			return true
		}
	}
	return false
}

// testInsufficient: two live nodes for three replicas; the others lack
// the spread label or a lease. Nothing is placed until a third node's
// agent starts.
func testInsufficient(e *env) {
	t := e.t
	e.node("few-a", "group", "few")
	e.node("few-b", "group", "few")
	e.node("few-c", "group", "few")
	e.node("few-d", "group", "few", "rack", "r1", "kubernetes.io/hostname", "")
	e.node("few-e", "group", "other", "rack", "r2")
	for _, n := range []string{"few-a", "few-b", "few-d", "few-e"} {
		e.renew(n, long)
	}
	e.createQV("few", 3, v1alpha1.Placement{NodeSelector: group("few"), SpreadKey: "kubernetes.io/hostname"})
	qv := e.waitFor("few", "Placed False", func(qv *v1alpha1.QuorumVolume) bool {
		return meta.IsStatusConditionFalse(qv.Status.Conditions, ConditionPlaced)
	})
	c := meta.FindStatusCondition(qv.Status.Conditions, ConditionPlaced)
	if c.Reason != ReasonInsufficientNodes {
		t.Errorf("Placed reason %s, want %s", c.Reason, ReasonInsufficientNodes)
	}
	for _, want := range []string{
		"need 3 more node(s) with distinct values of kubernetes.io/hostname, 2 eligible",
		"few-c has no agent lease quorum-agent-few-c (node agent not running)",
		"few-d lacks the spread label kubernetes.io/hostname",
		"node(s) do not match placement.nodeSelector",
	} {
		if !strings.Contains(c.Message, want) {
			t.Errorf("Placed message %q lacks %q", c.Message, want)
		}
	}
	if len(qv.Status.Replicas) != 0 || qv.Status.Phase != v1alpha1.VolumePending {
		t.Errorf("replicas %v, phase %s; want none placed and Pending", qv.Status.Replicas, qv.Status.Phase)
	}
	e.waitEvent("few", ReasonInsufficientNodes, "Warning", "2 eligible")

	// A spread key few-d lacks, and a node outside the selector.
	e.createQV("few-rack", 2, v1alpha1.Placement{NodeSelector: group("few"), SpreadKey: "rack"})
	qv = e.waitFor("few-rack", "Placed False", func(qv *v1alpha1.QuorumVolume) bool {
		return meta.IsStatusConditionFalse(qv.Status.Conditions, ConditionPlaced)
	})
	msg := meta.FindStatusCondition(qv.Status.Conditions, ConditionPlaced).Message
	for _, want := range []string{"1 eligible", "few-a lacks the spread label rack", "few-b lacks the spread label rack", "do not match placement.nodeSelector"} {
		if !strings.Contains(msg, want) {
			t.Errorf("Placed message %q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, "few-e") {
		t.Errorf("Placed message %q names few-e, which the selector leaves out (counted, not listed)", msg)
	}

	// The third agent starts: the Lease's creation places the volume,
	// on the three nodes that qualify.
	e.renew("few-c", long)
	qv = e.waitFor("few", "three replicas placed", placedAll(3))
	if got := nodesOf(qv); !slices.Equal(got, []string{"few-a", "few-b", "few-c"}) {
		t.Errorf("replicas on %v, want few-a, few-b, few-c", got)
	}
	if !meta.IsStatusConditionTrue(qv.Status.Conditions, ConditionPlaced) {
		t.Errorf("Placed condition not True after placement: %+v", qv.Status.Conditions)
	}
}

// testLeaseExpiry: a node agent stops renewing its short lease; its
// replica turns Faulty and the volume Degraded; when the agent is back
// and reports the replica Healthy, the volume is Ready again.
func testLeaseExpiry(e *env, reg *prometheus.Registry) {
	t := e.t
	for _, n := range []string{"lease-a", "lease-b", "lease-c"} {
		e.node(n, "group", "lease")
	}
	stop := e.keepRenewing("lease-a", 2*time.Second)
	e.renew("lease-b", long)
	e.renew("lease-c", long)
	e.createQV("lease", 3, v1alpha1.Placement{NodeSelector: group("lease")})
	qv := e.waitFor("lease", "three replicas placed", placedAll(3))
	for _, r := range qv.Status.Replicas {
		e.reportHealthy("lease", r.Name)
	}
	e.waitFor("lease", "phase Ready", phaseIs(v1alpha1.VolumeReady))

	waitLeaseGauge(e, reg, "lease-a", 1)
	waitLeaseGauge(e, reg, "lease-b", 1)
	stop()
	qv = e.waitFor("lease", "phase Degraded", phaseIs(v1alpha1.VolumeDegraded))
	waitLeaseGauge(e, reg, "lease-a", 0)
	waitLeaseGauge(e, reg, "lease-b", 1)
	if got := volumePhases(t, reg, "lease"); !slices.Equal(got, []string{"Degraded"}) {
		t.Errorf("quorum_volume_phase{volume=lease} at 1 for %v, want [Degraded] alone", got)
	}
	r := replicaOn(qv, "lease-a")
	if r == nil || r.State != v1alpha1.ReplicaFaulty || r.Message != "node agent on lease-a not renewing its lease" {
		t.Fatalf("replica on lease-a: %+v; want Faulty, node agent on lease-a not renewing its lease", r)
	}
	if qv.Status.Ready != "2/3" {
		t.Errorf("ready %q, want 2/3", qv.Status.Ready)
	}
	if c := meta.FindStatusCondition(qv.Status.Conditions, ConditionReady); c == nil || c.Reason != string(v1alpha1.VolumeDegraded) {
		t.Errorf("Ready condition %+v, want reason Degraded", c)
	}
	e.waitEvent("lease", "Degraded", "Warning", "not renewing its lease")
	e.waitEvent("lease", "ReplicaFaulty", "Warning", r.Name)

	// The agent comes back: a renewed lease alone does not make the
	// replica Healthy, the agent's report does.
	e.renew("lease-a", long)
	waitLeaseGauge(e, reg, "lease-a", 1)
	time.Sleep(500 * time.Millisecond)
	if got := e.get("lease"); got.Status.Phase != v1alpha1.VolumeDegraded {
		t.Errorf("phase %s after the lease alone was renewed, want still Degraded", got.Status.Phase)
	}
	e.reportHealthy("lease", r.Name)
	qv = e.waitFor("lease", "phase Ready", phaseIs(v1alpha1.VolumeReady))
	if got := replicaOn(qv, "lease-a"); got == nil || got.State != v1alpha1.ReplicaHealthy || got.Name != r.Name {
		t.Errorf("replica on lease-a: %+v, want %s Healthy", got, r.Name)
	}
}

// testNodeDeleted: a node holding a replica is deleted; the replica turns
// Stale, a replacement goes to the fourth node, and the Stale entry is
// removed once the replacement is Healthy.
func testNodeDeleted(e *env) {
	t := e.t
	qv := e.placedInGroup("gone")
	if got := nodesOf(qv); !slices.Equal(got, []string{"gone-a", "gone-b", "gone-c"}) {
		t.Fatalf("replicas on %v, want gone-a, gone-b, gone-c", got)
	}
	for _, r := range qv.Status.Replicas {
		e.reportHealthy("gone", r.Name)
	}
	e.waitFor("gone", "phase Ready", phaseIs(v1alpha1.VolumeReady))

	e.deleteNode("gone-a")
	qv = e.waitFor("gone", "a replacement", placedAll(4))
	old, repl := replicaOn(qv, "gone-a"), replicaOn(qv, "gone-d")
	if old == nil || old.Name != "r0" || old.State != v1alpha1.ReplicaStale || !strings.Contains(old.Message, "gone-a is gone") {
		t.Errorf("old replica %+v, want r0 Stale because gone-a is gone", old)
	}
	if repl == nil || repl.Name != "r3" || repl.State != v1alpha1.ReplicaCreating {
		t.Fatalf("replacement %+v, want r3 Creating on gone-d", repl)
	}
	qv = e.waitFor("gone", "phase Degraded", phaseIs(v1alpha1.VolumeDegraded))
	e.waitEvent("gone", "ReplicaStale", "Warning", "node gone-a is gone")
	e.waitEvent("gone", ReasonPlaced, "Normal", "r3 on gone-d")
	if len(qv.Status.Replicas) != 4 {
		t.Errorf("%d replicas listed while the replacement is Creating, want 4 (the Stale one stays)", len(qv.Status.Replicas))
	}

	e.reportHealthy("gone", "r3")
	qv = e.waitFor("gone", "the stale entry removed", placedAll(3))
	if got := nodesOf(qv); !slices.Equal(got, []string{"gone-b", "gone-c", "gone-d"}) {
		t.Errorf("replicas on %v, want gone-b, gone-c, gone-d", got)
	}
	e.waitFor("gone", "phase Ready", phaseIs(v1alpha1.VolumeReady))
	e.waitEvent("gone", "ReplicaRemoved", "Normal", "r0")
}

// testFinalizer: deletion waits until the agents removed their replica
// entries, or until the remaining ones are on nodes that are gone.
func testFinalizer(e *env) {
	t := e.t
	qv := e.placedInGroup("fin")
	// The least loaded node left is fin-d.
	e.createQV("fin-one", 1, v1alpha1.Placement{NodeSelector: group("fin")})
	one := e.waitFor("fin-one", "one replica placed", placedAll(1))
	if got := nodesOf(one); !slices.Equal(got, []string{"fin-d"}) {
		t.Errorf("fin-one placed on %v, want fin-d (the only node without a replica)", got)
	}

	if err := e.c.Delete(t.Context(), qv); err != nil {
		t.Fatal(err)
	}
	e.waitFor("fin", "phase Deleting", phaseIs(v1alpha1.VolumeDeleting))
	for _, r := range qv.Status.Replicas[:2] {
		e.agentUpdate("fin", r.Name, nil)
	}
	time.Sleep(500 * time.Millisecond)
	if got := e.get("fin"); len(got.Status.Replicas) != 1 || !slices.Contains(got.Finalizers, Finalizer) {
		t.Fatalf("after two of three replicas were removed: replicas %v, finalizers %v; want one left, still held", got.Status.Replicas, got.Finalizers)
	}
	e.agentUpdate("fin", qv.Status.Replicas[2].Name, nil)
	e.waitGone("fin")

	// Nothing can delete a replica whose node is gone.
	if err := e.c.Delete(t.Context(), one); err != nil {
		t.Fatal(err)
	}
	e.waitFor("fin-one", "phase Deleting", phaseIs(v1alpha1.VolumeDeleting))
	time.Sleep(500 * time.Millisecond)
	if err := e.c.Get(t.Context(), client.ObjectKeyFromObject(one), one); err != nil {
		t.Fatalf("fin-one gone while its replica's node exists: %v", err)
	}
	e.deleteNode("fin-d")
	e.waitGone("fin-one")
}

// testMigrationHoldsRebuild: a replica's node goes while a live migration
// holds two attachments; its replacement is placed only once the
// migration ends, whether by confirming it (the source unpublished) or by
// rolling it back (the target unpublished).
func testMigrationHoldsRebuild(e *env) {
	parent := e.t
	for _, tc := range []struct {
		name string
		end  string // the attachment unpublished to end the migration
	}{
		{"confirmed", "source"},
		{"rolled back", "target"},
	} {
		parent.Run(tc.name, func(t *testing.T) {
			e.t = t
			ctx := t.Context()
			rec := contract.NewEventRecorder(e.c, FieldManager, "test")
			g := "mig-" + tc.end
			qv := e.placedInGroup(g)
			for _, r := range qv.Status.Replicas {
				e.reportHealthy(g, r.Name)
			}
			e.waitFor(g, "phase Ready", phaseIs(v1alpha1.VolumeReady))
			attached := map[string]string{"source": g + "-vm-a", "target": g + "-vm-b"}
			for _, n := range []string{attached["source"], attached["target"]} {
				if _, err := contract.Attach(ctx, e.c, rec, g, n, true); err != nil {
					t.Fatal(err)
				}
			}

			e.deleteNode(g + "-a")
			qv = e.waitFor(g, "Placed False, MigrationInProgress", func(qv *v1alpha1.QuorumVolume) bool {
				c := meta.FindStatusCondition(qv.Status.Conditions, ConditionPlaced)
				return c != nil && c.Reason == ReasonMigrationInProgress
			})
			if len(qv.Status.Replicas) != 3 || qv.Status.Replicas[0].State != v1alpha1.ReplicaStale {
				t.Fatalf("replicas %+v during the migration, want the three placed, r0 Stale, and no replacement", qv.Status.Replicas)
			}
			e.waitEvent(g, ReasonMigrationInProgress, "Normal", "1 replica(s) to replace wait")

			if err := contract.Detach(ctx, e.c, rec, g, attached[tc.end]); err != nil {
				t.Fatal(err)
			}
			qv = e.waitFor(g, "a replacement once the migration ended", placedAll(4))
			if r := replicaOn(qv, g+"-d"); r == nil || r.Name != "r3" {
				t.Errorf("replacement %+v, want r3 on %s", r, g+"-d")
			}
			if c := meta.FindStatusCondition(qv.Status.Conditions, ConditionPlaced); c == nil || c.Reason != ReasonPlaced {
				t.Errorf("condition Placed %+v, want reason Placed", c)
			}
		})
	}
}
