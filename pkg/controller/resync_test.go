package controller

import (
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// testResync: the engine of the Active attachment reports bytes out of
// sync for a replica its agent reports Healthy; the controller shows it
// Resyncing with its progress (also in kubectl get qv) and keeps the
// volume from Ready until the engine reports none. A Standby's view is
// ignored until it becomes the Active one; the view of an attachment
// that is gone is cleared.
func testResync(e *env, srv *kubetest.Server) {
	t := e.t
	ctx := t.Context()
	qv := e.placedInGroup("resync")
	for _, r := range qv.Status.Replicas {
		e.reportHealthy("resync", r.Name)
	}
	e.waitFor("resync", "phase Ready", phaseIs(v1alpha1.VolumeReady))
	rec := contract.NewEventRecorder(e.c, FieldManager, "test")
	a, err := contract.Attach(ctx, e.c, rec, "resync", "resync-a", true)
	if err != nil {
		t.Fatal(err)
	}
	// engine writes the engine's view of r1 as the attached node would
	// (the fields only; 0 bytes clears them).
	engine := func(epoch, bytes int64, percent *int32) {
		t.Helper()
		e.agentUpdate("resync", "r1", func(r *v1alpha1.ReplicaStatus) {
			r.EngineEpoch, r.OutOfSyncBytes, r.ResyncPercent = epoch, bytes, percent
			if bytes == 0 {
				r.EngineEpoch, r.ResyncPercent = 0, nil
			}
		})
	}
	resyncing := func(percent int32) func(*v1alpha1.QuorumVolume) bool {
		return func(qv *v1alpha1.QuorumVolume) bool {
			r := qv.Status.Replicas[1]
			return r.State == v1alpha1.ReplicaResyncing && qv.Status.Phase == v1alpha1.VolumeDegraded &&
				ptr.Deref(qv.Status.ResyncPercent, -1) == percent && qv.Status.Ready == "2/3"
		}
	}
	// printed checks the RESYNC column of kubectl get qv, by the
	// header's offsets (an empty cell would shift a split on spaces).
	printed := func(want string) {
		t.Helper()
		out, err := srv.Kubectl(t, "get", "qv", "resync")
		lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
		if err != nil || len(lines) != 2 {
			t.Fatalf("kubectl get qv resync printed %q, %v; want a header and a row", out, err)
		}
		from, to := strings.Index(lines[0], "RESYNC"), strings.Index(lines[0], "PATTERN")
		if from < 0 || to < from || len(lines[1]) < to {
			t.Fatalf("kubectl get qv resync printed no RESYNC column before PATTERN:\n%s", out)
		}
		if got := strings.TrimSpace(lines[1][from:to]); got != want {
			t.Errorf("kubectl get qv: RESYNC %q, want %q:\n%s", got, want, out)
		}
	}

	engine(a.Epoch, 8<<20, nil)
	qv = e.waitFor("resync", "r1 Resyncing at 0%", resyncing(0))
	if c := meta.FindStatusCondition(qv.Status.Conditions, ConditionReady); c == nil || c.Status != metav1.ConditionFalse ||
		!strings.Contains(c.Message, "r1 on resync-b: Resyncing (8388608 bytes out of sync, 0% resynced)") {
		t.Errorf("Ready condition %+v; want False naming r1's resync", c)
	}
	e.waitEvent("resync", "ReplicaResyncing", corev1.EventTypeNormal, "replica r1 on resync-b misses 8388608 bytes; the engine on node resync-a copies them")
	engine(a.Epoch, 2<<20, ptr.To[int32](75))
	e.waitFor("resync", "r1 Resyncing at 75%", resyncing(75))
	printed("75")
	// The agent reports the replica served while it resyncs: the state
	// stays Resyncing (the agent leaves it to the controller).
	e.agentUpdate("resync", "r1", func(r *v1alpha1.ReplicaStatus) { r.Message = "served" })
	engine(a.Epoch, 0, nil)
	qv = e.waitFor("resync", "phase Ready again", phaseIs(v1alpha1.VolumeReady))
	if r := qv.Status.Replicas[1]; r.State != v1alpha1.ReplicaHealthy || qv.Status.ResyncPercent != nil || qv.Status.Ready != "3/3" {
		t.Errorf("r1 %s, status.resyncPercent %v, ready %s; want Healthy, unset, 3/3", r.State, qv.Status.ResyncPercent, qv.Status.Ready)
	}
	e.waitEvent("resync", "ReplicaInSync", corev1.EventTypeNormal, "replica r1 on resync-b holds every acknowledged write again")
	printed("")

	// A live migration's Standby has an engine that does not resync:
	// whatever was written with its epoch counts for nothing until it
	// becomes the Active attachment.
	b, err := contract.Attach(ctx, e.c, rec, "resync", "resync-b", true)
	if err != nil {
		t.Fatal(err)
	}
	engine(b.Epoch, 4096, ptr.To[int32](10))
	time.Sleep(time.Second) // a reconcile would have shown it by now
	if qv := e.get("resync"); qv.Status.Phase != v1alpha1.VolumeReady || qv.Status.Replicas[1].OutOfSyncBytes != 4096 {
		t.Errorf("a Standby's view: phase %s, r1 %+v; want Ready with the view kept", qv.Status.Phase, qv.Status.Replicas[1])
	}
	if err := contract.Detach(ctx, e.c, rec, "resync", "resync-a"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("resync", "the former Standby's view shown", resyncing(10))

	// The node crashed and was unpublished without clearing its view: it
	// holds nothing back once its attachment is gone, and is cleared.
	if err := contract.Detach(ctx, e.c, rec, "resync", "resync-b"); err != nil {
		t.Fatal(err)
	}
	e.waitFor("resync", "Ready with the view cleared", func(qv *v1alpha1.QuorumVolume) bool {
		r := qv.Status.Replicas[1]
		return qv.Status.Phase == v1alpha1.VolumeReady && r.EngineEpoch == 0 && r.OutOfSyncBytes == 0 && r.ResyncPercent == nil
	})
}
