package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/go-logr/logr"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// maxMessage is status.replicas[].message's schema limit.
const maxMessage = 1024

// reconciler makes the node's replicas match the QuorumVolumes' status
// and reports them there. One reconcile at a time (the controller's
// default), so the replica set sees one volume's changes in order.
type reconciler struct {
	c        client.Client
	node     string
	manager  string // field manager of the status apply
	endpoint string // host:port of the NBD server, as clients reach it
	set      *replicaSet
	log      logr.Logger
	now      func() time.Time

	// reported is, per volume, the replicas of this node that the last
	// apply of this process reported. An entry that leaves the status
	// (or the node) after that was removed by the controller, which is
	// the signal to delete its image.
	reported map[string][]string
}

// Report is what became of one replica of the node: its entry as the
// agent reports it (ReportReplicas).
type Report struct {
	Name    string
	State   v1alpha1.ReplicaState
	Message string
}

func (r *reconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	vol := req.Name
	log := r.log.WithValues("volume", vol)
	qv := &v1alpha1.QuorumVolume{}
	if err := r.c.Get(ctx, req.NamespacedName, qv); err != nil {
		if !apierrors.IsNotFound(err) {
			return ctrl.Result{}, fmt.Errorf("get QuorumVolume %s: %w", vol, err)
		}
		// Gone without this agent seeing its deletion (the finalizer was
		// removed by hand): without that signal nothing is deleted.
		if cur, ok := r.set.lookup(vol); ok {
			log.Info("volume is gone; stopped serving its replica and left the image (orphan)", "replica", cur.replica, "path", cur.path)
		}
		delete(r.reported, vol)
		return ctrl.Result{}, r.set.stop(vol)
	}
	uid := string(qv.UID)
	if cur, ok := r.set.lookup(vol); ok && cur.uid != uid {
		log.Info("volume was recreated; stopped serving the old one's replica and left the image (orphan)", "replica", cur.replica, "path", cur.path, "oldUID", cur.uid)
		delete(r.reported, vol)
		if err := r.set.stop(vol); err != nil {
			return ctrl.Result{}, err
		}
	}
	if qv.DeletionTimestamp != nil {
		return ctrl.Result{}, r.deleteVolume(ctx, log, qv)
	}

	mine := r.entries(qv)
	var errs []error
	for _, rep := range r.removed(vol, mine) {
		if err := r.set.remove(vol, uid, rep); err != nil {
			if errors.Is(err, errNotOurs) {
				log.Info("replica left the status; its image is not its own, left in place", "replica", rep, "reason", err.Error())
				continue
			}
			r.set.m.failures.WithLabelValues(vol, "delete").Inc()
			errs = append(errs, err)
		}
	}
	size := qv.Spec.Size.Value()
	var outs []Report
	for _, rep := range mine {
		// Stale is the controller's final word on a replica whose Node is
		// gone: forcing Healthy over it would flip the entry back and
		// forth with the controller for as long as this agent runs. The
		// entry is left out of the report, which drops this agent's
		// fields (the endpoint) from it, and its image stays until the
		// controller removes the entry.
		if entryState(qv, rep) == v1alpha1.ReplicaStale {
			continue
		}
		out := Report{Name: rep, State: inSync(entryState(qv, rep))}
		if err := r.set.ensure(vol, uid, rep, size); err != nil {
			r.set.m.failures.WithLabelValues(vol, "serve").Inc()
			log.Error(err, "replica is faulty", "replica", rep)
			out.State, out.Message = v1alpha1.ReplicaFaulty, err.Error()
			errs = append(errs, err)
		} else {
			out.Message = fmt.Sprintf("served at %s, %d bytes", r.endpoint, size)
		}
		outs = append(outs, out)
	}
	if len(outs) > 0 || r.ownsStatus(qv) {
		if err := r.apply(ctx, qv, outs); err != nil {
			errs = append(errs, err)
		}
	}
	r.reported[vol] = mine
	if len(mine) == 0 {
		delete(r.reported, vol)
	}
	// An error retries with the controller's backoff; the status already
	// says what failed.
	return ctrl.Result{}, errors.Join(errs...)
}

// entries names the replicas placed on this node, sorted.
func (r *reconciler) entries(qv *v1alpha1.QuorumVolume) []string {
	var names []string
	for _, e := range qv.Status.Replicas {
		if e.Node == r.node {
			names = append(names, e.Name)
		}
	}
	slices.Sort(names)
	return names
}

// entryState is the state of the volume's entry named rep.
func entryState(qv *v1alpha1.QuorumVolume, rep string) v1alpha1.ReplicaState {
	for _, e := range qv.Status.Replicas {
		if e.Name == rep {
			return e.State
		}
	}
	return ""
}

// inSync is the state the agent reports for a replica it serves, given
// the entry's state: Healthy, unless the controller shows it Resyncing
// (the Active attachment's engine reports bytes the replica misses).
// That the image is served says nothing about whether it holds every
// write, so the agent leaves that word to the controller rather than
// force Healthy over it; the controller turns it Healthy once the engine
// reports none missing.
func inSync(entry v1alpha1.ReplicaState) v1alpha1.ReplicaState {
	if entry == v1alpha1.ReplicaResyncing {
		return entry
	}
	return v1alpha1.ReplicaHealthy
}

// removed lists the replicas this node served or reported for vol that
// are no longer placed on it.
func (r *reconciler) removed(vol string, mine []string) []string {
	gone := map[string]bool{}
	for _, rep := range r.reported[vol] {
		gone[rep] = true
	}
	if cur, ok := r.set.lookup(vol); ok {
		gone[cur.replica] = true
	}
	for _, rep := range mine {
		delete(gone, rep)
	}
	names := make([]string, 0, len(gone))
	for rep := range gone {
		names = append(names, rep)
	}
	slices.Sort(names)
	return names
}

// deleteVolume deletes the node's replicas of a volume being deleted:
// those placed here, the one served, and every image under the volume's
// folder that carries the volume's uid (placed here in an earlier life of
// the agent). Then it withdraws its status entries, which is what the
// controller waits for before it removes its finalizer.
func (r *reconciler) deleteVolume(ctx context.Context, log logr.Logger, qv *v1alpha1.QuorumVolume) error {
	vol, uid := qv.Name, string(qv.UID)
	placed := r.entries(qv)
	reps := slices.Clone(placed)
	if cur, ok := r.set.lookup(vol); ok {
		reps = append(reps, cur.replica)
	}
	disk, err := r.set.onDisk(vol)
	if err != nil {
		return err
	}
	reps = append(reps, disk...)
	slices.Sort(reps)
	reps = slices.Compact(reps)
	var errs []error
	var failed []Report // entries whose image could not be deleted
	for _, rep := range reps {
		err := r.set.remove(vol, uid, rep)
		switch {
		case errors.Is(err, errNotOurs):
			log.Info("volume deleted; an image in its folder is not its own, left in place", "replica", rep, "reason", err.Error())
		case err != nil:
			r.set.m.failures.WithLabelValues(vol, "delete").Inc()
			errs = append(errs, err)
			if slices.Contains(placed, rep) {
				failed = append(failed, Report{Name: rep, State: v1alpha1.ReplicaFaulty, Message: err.Error()})
			}
		}
	}
	if len(errs) > 0 {
		if len(failed) > 0 {
			if err := r.apply(ctx, qv, failed); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	}
	if err := r.withdraw(ctx, qv); err != nil {
		return err
	}
	delete(r.reported, vol)
	return nil
}

// withdraw removes the node's entries from a deleted volume's status.
// Whole entries go, by a JSON patch guarded by the uid and each entry's
// name: an apply without them would only drop this agent's fields, and
// what the controller owns in them (name, node) would stay behind as an
// entry without its required state. An apply with no entries then drops
// whatever this field manager still owns (entries the controller already
// let go of).
func (r *reconciler) withdraw(ctx context.Context, qv *v1alpha1.QuorumVolume) error {
	ops := []map[string]any{{"op": "test", "path": "/metadata/uid", "value": string(qv.UID)}}
	for i := len(qv.Status.Replicas) - 1; i >= 0; i-- {
		if e := qv.Status.Replicas[i]; e.Node == r.node {
			path := fmt.Sprintf("/status/replicas/%d", i)
			ops = append(ops, map[string]any{"op": "test", "path": path + "/name", "value": e.Name}, map[string]any{"op": "remove", "path": path})
		}
	}
	if len(ops) > 1 {
		b, err := json.Marshal(ops)
		if err != nil {
			return fmt.Errorf("withdraw replicas of %s: %w", qv.Name, err)
		}
		// A failed test (the status changed meanwhile) fails the patch;
		// the reconcile is retried with the newer status.
		if err := r.c.Status().Patch(ctx, qv, client.RawPatch(types.JSONPatchType, b), client.FieldOwner(r.manager)); err != nil {
			return fmt.Errorf("withdraw replicas of %s from its status: %w", qv.Name, err)
		}
	}
	if r.ownsStatus(qv) {
		return r.apply(ctx, qv, nil)
	}
	return nil
}

// ownsStatus reports whether this agent's field manager owns anything in
// the volume's status, i.e. whether an apply is needed to withdraw it.
func (r *reconciler) ownsStatus(qv *v1alpha1.QuorumVolume) bool { return ownsStatus(qv, r.manager) }

// ownsStatus reports whether manager's applies own anything in the
// volume's status. An apply with no entries leaves it owning the empty
// status object, which is nothing to withdraw.
func ownsStatus(qv *v1alpha1.QuorumVolume, manager string) bool {
	for _, mf := range qv.ManagedFields {
		if mf.Manager == manager && mf.Subresource == "status" && mf.Operation == metav1.ManagedFieldsOperationApply {
			return mf.FieldsV1 != nil && len(mf.FieldsV1.Raw) > len(`{"f:status":{}}`)
		}
	}
	return false
}

// apply reports the node's replicas of qv (ReportReplicas).
func (r *reconciler) apply(ctx context.Context, qv *v1alpha1.QuorumVolume, outs []Report) error {
	return ReportReplicas(ctx, r.c, qv, r.node, r.endpoint, r.now(), outs)
}

// ReportReplicas writes node's replica entries of qv with server-side
// apply, under the agent's own field manager (FieldManager(node)) and
// with nothing else in it: the controller's fields (node, phase,
// attachments, ...) and other agents' entries are untouched, and an
// entry left out of the apply loses this agent's fields. Ownership of
// state and the other reported fields is forced, because the controller
// wrote Creating (or Faulty) into them and only the agent knows the
// replica's state on its node. The uid makes the apply fail, rather than
// write, on a volume recreated meanwhile. A Healthy or Resyncing (served)
// entry gets endpoint;
// an entry whose state stays keeps its lastTransitionTime, a changed one
// gets now. The agent's reconciler reports through it, and so do the
// simulated agents of the scale benchmark (bench/scale).
func ReportReplicas(ctx context.Context, c client.Client, qv *v1alpha1.QuorumVolume, node, endpoint string, now time.Time, reports []Report) error {
	entries := make([]any, 0, len(reports))
	for _, o := range reports {
		e := map[string]any{
			"name":               o.Name,
			"state":              string(o.State),
			"message":            truncate(o.Message, maxMessage),
			"lastTransitionTime": transitionTime(qv, o.Name, o.State, now).UTC().Format(time.RFC3339),
		}
		if o.State == v1alpha1.ReplicaHealthy || o.State == v1alpha1.ReplicaResyncing {
			e["endpoint"] = endpoint
		}
		entries = append(entries, e)
	}
	if err := applyReplicas(ctx, c, qv, FieldManager(node), entries); err != nil {
		return fmt.Errorf("report replicas of %s in its status: %w", qv.Name, err)
	}
	return nil
}

// applyReplicas applies status.replicas entries (each with its name and
// the fields manager reports) to qv with server-side apply under
// manager, forced, and nothing else: whatever manager owned and left
// out goes. The uid makes the apply fail, rather than write, on a volume
// recreated meanwhile.
func applyReplicas(ctx context.Context, c client.Client, qv *v1alpha1.QuorumVolume, manager string, entries []any) error {
	status := map[string]any{}
	if len(entries) > 0 {
		status["replicas"] = entries
	}
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": v1alpha1.GroupVersion.String(),
		"kind":       "QuorumVolume",
		"metadata":   map[string]any{"name": qv.Name, "uid": string(qv.UID)},
		"status":     status,
	}}
	return c.Status().Apply(ctx, client.ApplyConfigurationFromUnstructured(u), client.FieldOwner(manager), client.ForceOwnership)
}

// transitionTime keeps an entry's lastTransitionTime while its state
// stays, so that repeating a report changes nothing (and an unchanged
// apply writes nothing, which also keeps reconciles from feeding
// themselves).
func transitionTime(qv *v1alpha1.QuorumVolume, name string, state v1alpha1.ReplicaState, now time.Time) time.Time {
	for _, e := range qv.Status.Replicas {
		if e.Name == name && e.State == state && !e.LastTransitionTime.IsZero() {
			return e.LastTransitionTime.Time
		}
	}
	return now.Truncate(time.Second)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-3] + "..."
}
