package controller

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	kerrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	crcontroller "sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

const (
	// FieldManager is the field manager of everything the controller
	// writes, and the reportingController of its Events.
	FieldManager = contract.ControllerFieldManager
	// Finalizer holds a QuorumVolume until its replica images are gone.
	Finalizer = "quorum.csi.dev/replicas"

	// insufficientRetry is how often an unplaceable volume is retried
	// besides the retries that Node and Lease changes trigger; a safety
	// net for changes that reach no watch, not the main path.
	insufficientRetry = 30 * time.Second
	// expirySlack is added to a lease's expiry before looking again, so
	// that the lease is certainly expired by then.
	expirySlack = 200 * time.Millisecond

	// DefaultWorkers is how many volumes are reconciled at once unless
	// Options.Workers says otherwise. A reconcile spends its time waiting
	// for the API server (a status update, a patch), not computing, so
	// one worker would leave a thousand new volumes queued behind each
	// other's round trips (bench/scale.sh: 214 s until all were Ready with
	// one worker). The workqueue never hands one volume to two workers.
	DefaultWorkers = 8
)

// Options configure a Reconciler.
type Options struct {
	// Namespace holds the agents' Leases (contract.DefaultNamespace when empty).
	Namespace string
	// Registerer gets the quorum_volumes, quorum_volume_phase and
	// quorum_agent_lease_current gauges; controller-runtime's registry,
	// served on the metrics endpoint, when nil.
	Registerer prometheus.Registerer
	// Workers is how many volumes are reconciled at once
	// (DefaultWorkers when 0).
	Workers int
}

// Reconciler places QuorumVolume replicas, follows their nodes' health,
// derives the phase and conditions, and holds deleted volumes until their
// replicas are gone. See the package documentation for the contract with
// the node agents.
type Reconciler struct {
	client    client.Client
	recorder  events.EventRecorder
	namespace string
	workers   int
	metrics   *phaseMetrics
	expiries  *leaseExpiries
}

// New returns a Reconciler that reads and writes through c (normally the
// manager's cached client) and records Events with rec.
func New(c client.Client, rec events.EventRecorder, opts Options) (*Reconciler, error) {
	if opts.Namespace == "" {
		opts.Namespace = contract.DefaultNamespace
	}
	if opts.Registerer == nil {
		opts.Registerer = metrics.Registry
	}
	if opts.Workers < 0 {
		return nil, fmt.Errorf("QuorumVolume controller: %d workers", opts.Workers)
	}
	if opts.Workers == 0 {
		opts.Workers = DefaultWorkers
	}
	m, err := newPhaseMetrics(opts.Registerer)
	if err != nil {
		return nil, err
	}
	r := &Reconciler{client: c, recorder: rec, namespace: opts.Namespace, workers: opts.Workers, metrics: m, expiries: newLeaseExpiries()}
	if err := opts.Registerer.Register(newLeaseCollector(r.observe)); err != nil {
		return nil, fmt.Errorf("register quorum_agent_lease_current: %w", err)
	}
	return r, nil
}

// CacheOptions limits the manager's Lease cache to the agents' namespace,
// so the controller needs no cluster-wide access to Leases.
func CacheOptions(namespace string) cache.Options {
	return cache.Options{ByObject: map[client.Object]cache.ByObject{
		&coordinationv1.Lease{}: {Namespaces: map[string]cache.Config{namespace: {}}},
	}}
}

// SetupWithManager registers the reconciler. Besides QuorumVolumes it
// watches Nodes and the agents' Leases, and maps a change of either, and
// the expiry of a Lease (leaseExpiries), to the volumes it can affect.
func (r *Reconciler) SetupWithManager(mgr ctrl.Manager) error {
	if err := mgr.Add(r.expiries); err != nil {
		return fmt.Errorf("set up QuorumVolume controller: %w", err)
	}
	forLease := r.volumesForNode(r.leaseNode)
	err := ctrl.NewControllerManagedBy(mgr).
		For(&v1alpha1.QuorumVolume{}).
		Watches(&corev1.Node{}, handler.EnqueueRequestsFromMapFunc(r.volumesForNode(func(o client.Object) string { return o.GetName() })),
			builder.WithPredicates(nodeChanged())).
		Watches(&coordinationv1.Lease{}, handler.EnqueueRequestsFromMapFunc(forLease),
			builder.WithPredicates(leaseLivenessChanged())).
		Watches(&coordinationv1.Lease{}, r.trackExpiry()).
		WatchesRawSource(source.Channel(r.expiries.expired, handler.EnqueueRequestsFromMapFunc(forLease))).
		WithOptions(crcontroller.Options{MaxConcurrentReconciles: r.workers}).
		Complete(r)
	if err != nil {
		return fmt.Errorf("set up QuorumVolume controller: %w", err)
	}
	return nil
}

// trackExpiry sets the expiry timer of every agent Lease on each of its
// events, routine renewals included, and enqueues nothing itself.
func (r *Reconciler) trackExpiry() handler.EventHandler {
	track := func(o client.Object) {
		if l, ok := o.(*coordinationv1.Lease); ok && r.leaseNode(l) != "" {
			r.expiries.track(l)
		}
	}
	return handler.Funcs{
		CreateFunc: func(_ context.Context, e event.CreateEvent, _ workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			track(e.Object)
		},
		UpdateFunc: func(_ context.Context, e event.UpdateEvent, _ workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			track(e.ObjectNew)
		},
		DeleteFunc: func(_ context.Context, e event.DeleteEvent, _ workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			r.expiries.forget(e.Object)
		},
	}
}

// leaseNode is the node an agent Lease stands for, "" for other Leases.
func (r *Reconciler) leaseNode(o client.Object) string {
	node, ok := contract.LeaseNode(o.GetName())
	if !ok || o.GetNamespace() != r.namespace {
		return ""
	}
	return node
}

// volumesForNode maps a node's change to the volumes with a replica on
// it and to those still short of replicas, which the node may now take.
func (r *Reconciler) volumesForNode(nodeOf func(client.Object) string) handler.MapFunc {
	return func(ctx context.Context, o client.Object) []reconcile.Request {
		node := nodeOf(o)
		if node == "" {
			return nil
		}
		var list v1alpha1.QuorumVolumeList
		if err := r.client.List(ctx, &list); err != nil {
			log.FromContext(ctx).Error(err, "list QuorumVolumes for a node change", "node", node)
			return nil
		}
		var reqs []reconcile.Request
		for i := range list.Items {
			qv := &list.Items[i]
			if onNode(qv, node) || livePlaced(qv) < int(qv.Spec.Replicas) {
				reqs = append(reqs, reconcile.Request{NamespacedName: types.NamespacedName{Name: qv.Name}})
			}
		}
		return reqs
	}
}

func onNode(qv *v1alpha1.QuorumVolume, node string) bool {
	for _, rep := range qv.Status.Replicas {
		if rep.Node == node {
			return true
		}
	}
	return false
}

// livePlaced counts the replicas that are not Stale.
func livePlaced(qv *v1alpha1.QuorumVolume) int {
	n := 0
	for _, rep := range qv.Status.Replicas {
		if rep.State != v1alpha1.ReplicaStale {
			n++
		}
	}
	return n
}

// nodeChanged passes Node changes placement cares about: labels,
// cordoning, deletion; not the kubelet's status heartbeats.
func nodeChanged() predicate.Predicate {
	return predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
		o, n := e.ObjectOld.(*corev1.Node), e.ObjectNew.(*corev1.Node)
		return !equality.Semantic.DeepEqual(o.Labels, n.Labels) ||
			o.Spec.Unschedulable != n.Spec.Unschedulable ||
			(o.DeletionTimestamp == nil) != (n.DeletionTimestamp == nil)
	}}
}

// leaseLivenessChanged passes a Lease update only when it revives an
// expired lease or changes its holder: routine renewals change nothing.
// Expiry itself produces no watch event at all; leaseExpiries makes one.
func leaseLivenessChanged() predicate.Predicate {
	return predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
		o, n := e.ObjectOld.(*coordinationv1.Lease), e.ObjectNew.(*coordinationv1.Lease)
		return !contract.LeaseCurrent(o, time.Now()) || !ptr.Equal(o.Spec.HolderIdentity, n.Spec.HolderIdentity)
	}}
}

// Reconcile does one step for one volume: finish a deletion, or add the
// finalizer if missing and bring the status up to date (replica health
// from the nodes, replacement of Stale replicas, placement, phase,
// conditions).
func (r *Reconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	qv := &v1alpha1.QuorumVolume{}
	if err := r.client.Get(ctx, req.NamespacedName, qv); err != nil {
		if kerrors.IsNotFound(err) {
			r.metrics.set(req.Name, "")
			return reconcile.Result{}, nil
		}
		return reconcile.Result{}, fmt.Errorf("get QuorumVolume %s: %w", req.Name, err)
	}
	if qv.DeletionTimestamp != nil {
		return r.finalize(ctx, qv)
	}
	if !controllerutil.ContainsFinalizer(qv, Finalizer) {
		patch := client.MergeFromWithOptions(qv.DeepCopy(), client.MergeFromWithOptimisticLock{})
		controllerutil.AddFinalizer(qv, Finalizer)
		if err := r.client.Patch(ctx, qv, patch, client.FieldOwner(FieldManager)); err != nil {
			return ignoreConflict(fmt.Errorf("add finalizer to %s: %w", qv.Name, err))
		}
		// The patch answered with the stored volume and its new
		// resourceVersion, so the status step (the placement of a new
		// volume) goes on from it rather than from a reconcile of its own.
	}
	return r.updateStatus(ctx, qv)
}

// ignoreConflict drops a resourceVersion conflict: the newer version
// that caused it is already queued for reconciling.
func ignoreConflict(err error) (reconcile.Result, error) {
	if kerrors.IsConflict(err) {
		return reconcile.Result{}, nil
	}
	return reconcile.Result{}, err
}

// cluster is the nodes and leases as one reconcile sees them.
type cluster struct {
	now    time.Time
	nodes  map[string]*corev1.Node
	leases map[string]*coordinationv1.Lease // by node name
}

func (r *Reconciler) observe(ctx context.Context) (*cluster, error) {
	cl := &cluster{now: time.Now(), nodes: map[string]*corev1.Node{}, leases: map[string]*coordinationv1.Lease{}}
	var nodes corev1.NodeList
	if err := r.client.List(ctx, &nodes); err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	for i := range nodes.Items {
		cl.nodes[nodes.Items[i].Name] = &nodes.Items[i]
	}
	var leases coordinationv1.LeaseList
	if err := r.client.List(ctx, &leases, client.InNamespace(r.namespace)); err != nil {
		return nil, fmt.Errorf("list leases in %s: %w", r.namespace, err)
	}
	for i := range leases.Items {
		if node := r.leaseNode(&leases.Items[i]); node != "" {
			cl.leases[node] = &leases.Items[i]
		}
	}
	return cl, nil
}

// agentLive reports whether node's agent holds a current Lease, and if
// not, why not.
func (cl *cluster) agentLive(node string) (bool, string) {
	l, ok := cl.leases[node]
	switch {
	case !ok:
		return false, fmt.Sprintf("has no agent lease %s (node agent not running)", contract.LeaseName(node))
	case l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != node:
		return false, fmt.Sprintf("agent lease %s is held by %q, not the node", contract.LeaseName(node), ptr.Deref(l.Spec.HolderIdentity, ""))
	case !contract.LeaseCurrent(l, cl.now):
		return false, fmt.Sprintf("agent lease %s expired (node agent not renewing)", contract.LeaseName(node))
	}
	return true, ""
}

// pendingEvent is recorded once the status that it reports is stored.
type pendingEvent struct {
	eventType, reason, action, note string
}

func (r *Reconciler) updateStatus(ctx context.Context, qv *v1alpha1.QuorumVolume) (reconcile.Result, error) {
	cl, err := r.observe(ctx)
	if err != nil {
		return reconcile.Result{}, err
	}
	next := qv.DeepCopy()
	var evs []pendingEvent
	var result reconcile.Result

	evs = append(evs, markNodeHealth(next, cl)...)
	evs = append(evs, presentResync(next, cl.now)...)
	evs = append(evs, removeReplaced(next)...)
	placed, err := r.place(ctx, next, cl)
	if err != nil {
		return reconcile.Result{}, err
	}
	evs = append(evs, placed...)
	if c := meta.FindStatusCondition(next.Status.Conditions, ConditionPlaced); c != nil && c.Status == metav1.ConditionFalse {
		result.RequeueAfter = insufficientRetry
	}

	phase := Phase(next)
	next.Status.Phase = phase
	next.Status.Ready = next.ReadySummary()
	next.Status.ObservedGeneration = next.Generation
	ready := metav1.Condition{Type: ConditionReady, Status: metav1.ConditionTrue, Reason: ReasonReady,
		ObservedGeneration: next.Generation, Message: readyMessage(next)}
	if phase != v1alpha1.VolumeReady {
		ready.Status, ready.Reason = metav1.ConditionFalse, string(phase)
	}
	meta.SetStatusCondition(&next.Status.Conditions, ready)
	if phase != qv.Status.Phase && (phase == v1alpha1.VolumeDegraded || phase == v1alpha1.VolumeFaulted) {
		evs = append(evs, pendingEvent{corev1.EventTypeWarning, string(phase), "Health", ready.Message})
	}

	if !equality.Semantic.DeepEqual(qv.Status, next.Status) {
		if err := r.client.Status().Update(ctx, next, client.FieldOwner(FieldManager)); err != nil {
			return ignoreConflict(fmt.Errorf("update status of %s: %w", qv.Name, err))
		}
	}
	for _, e := range evs {
		r.recorder.Eventf(next, nil, e.eventType, e.reason, e.action, "%s", e.note)
	}
	r.metrics.set(next.Name, phase)
	return result, nil
}

// markNodeHealth marks replicas whose Node is gone Stale, and those whose
// agent stopped renewing its Lease Faulty. Only the agent reports a
// replica healthy again: a renewed lease says the agent runs, not that
// the replica caught up.
func markNodeHealth(qv *v1alpha1.QuorumVolume, cl *cluster) []pendingEvent {
	var evs []pendingEvent
	for i := range qv.Status.Replicas {
		rep := &qv.Status.Replicas[i]
		if rep.State == v1alpha1.ReplicaStale {
			continue
		}
		if _, ok := cl.nodes[rep.Node]; !ok {
			setReplicaState(rep, v1alpha1.ReplicaStale, fmt.Sprintf("node %s is gone", rep.Node), cl.now)
			evs = append(evs, pendingEvent{corev1.EventTypeWarning, "ReplicaStale", "NodeGone",
				fmt.Sprintf("replica %s is stale: node %s is gone; a replacement is placed elsewhere", rep.Name, rep.Node)})
			continue
		}
		if live, _ := cl.agentLive(rep.Node); !live && rep.State != v1alpha1.ReplicaFaulty {
			msg := fmt.Sprintf("node agent on %s not renewing its lease", rep.Node)
			setReplicaState(rep, v1alpha1.ReplicaFaulty, msg, cl.now)
			evs = append(evs, pendingEvent{corev1.EventTypeWarning, "ReplicaFaulty", "AgentLost",
				fmt.Sprintf("replica %s is faulty: %s", rep.Name, msg)})
		}
	}
	return evs
}

func setReplicaState(rep *v1alpha1.ReplicaStatus, state v1alpha1.ReplicaState, msg string, now time.Time) {
	rep.State = state
	rep.Message = msg
	rep.LastTransitionTime = metav1.NewTime(now)
}

// removeReplaced drops Stale replicas once spec.replicas others are
// Healthy: until then the Stale entry records which failure domain lost
// its copy and keeps the volume Degraded.
func removeReplaced(qv *v1alpha1.QuorumVolume) []pendingEvent {
	healthy := 0
	for _, rep := range qv.Status.Replicas {
		if rep.State == v1alpha1.ReplicaHealthy {
			healthy++
		}
	}
	if healthy < int(qv.Spec.Replicas) {
		return nil
	}
	var evs []pendingEvent
	kept := qv.Status.Replicas[:0]
	for _, rep := range qv.Status.Replicas {
		if rep.State == v1alpha1.ReplicaStale {
			evs = append(evs, pendingEvent{corev1.EventTypeNormal, "ReplicaRemoved", "Replace",
				fmt.Sprintf("removed stale replica %s (node %s): its replacement is healthy", rep.Name, rep.Node)})
			continue
		}
		kept = append(kept, rep)
	}
	qv.Status.Replicas = kept
	return evs
}

// place adds replicas until spec.replicas are not Stale, all at once or
// not at all, and sets the Placed condition.
func (r *Reconciler) place(ctx context.Context, qv *v1alpha1.QuorumVolume, cl *cluster) ([]pendingEvent, error) {
	need := int(qv.Spec.Replicas) - livePlaced(qv)
	cond := metav1.Condition{Type: ConditionPlaced, Status: metav1.ConditionTrue, Reason: ReasonPlaced,
		ObservedGeneration: qv.Generation,
		Message:            fmt.Sprintf("%d replica(s) placed on nodes with distinct %s", qv.Spec.Replicas, qv.Spec.Placement.SpreadKey)}
	if need <= 0 {
		meta.SetStatusCondition(&qv.Status.Conditions, cond)
		return nil, nil
	}
	if len(qv.Status.Attachments) > 1 {
		cond.Status, cond.Reason = metav1.ConditionFalse, ReasonMigrationInProgress
		cond.Message = fmt.Sprintf("%d replica(s) to replace wait until the live migration between %s ends",
			need, strings.Join(contract.AttachedNodes(qv), " and "))
		var evs []pendingEvent
		if old := meta.FindStatusCondition(qv.Status.Conditions, ConditionPlaced); old == nil || old.Reason != cond.Reason {
			evs = append(evs, pendingEvent{corev1.EventTypeNormal, ReasonMigrationInProgress, "Place", cond.Message})
		}
		meta.SetStatusCondition(&qv.Status.Conditions, cond)
		return evs, nil
	}
	load, err := r.load(ctx, qv.Name)
	if err != nil {
		return nil, err
	}
	req := PlacementRequest{
		Count:         need,
		NodeSelector:  qv.Spec.Placement.NodeSelector,
		SpreadKey:     qv.Spec.Placement.SpreadKey,
		PreferredNode: qv.Spec.Placement.PreferredNode,
		UsedSpread:    map[string]string{},
		UsedNodes:     map[string]bool{},
	}
	for _, rep := range qv.Status.Replicas {
		req.UsedNodes[rep.Node] = true
		if n, ok := cl.nodes[rep.Node]; ok && rep.State != v1alpha1.ReplicaStale {
			if v, ok := n.Labels[req.SpreadKey]; ok {
				req.UsedSpread[v] = rep.Name
			}
		}
	}
	infos := make([]NodeInfo, 0, len(cl.nodes))
	for _, n := range cl.nodes {
		live, why := cl.agentLive(n.Name)
		infos = append(infos, NodeInfo{Name: n.Name, Labels: n.Labels, AgentLive: live, NotLiveReason: why,
			Unschedulable: n.Spec.Unschedulable, BeingDeleted: n.DeletionTimestamp != nil, Load: load[n.Name]})
	}
	// Map order must not leak into the condition message.
	sort.Slice(infos, func(i, j int) bool { return infos[i].Name < infos[j].Name })
	p := Place(req, infos)
	if len(p.Nodes) == 0 {
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, ReasonInsufficientNodes, p.InsufficientMessage(req)
		var evs []pendingEvent
		if old := meta.FindStatusCondition(qv.Status.Conditions, ConditionPlaced); old == nil || old.Message != cond.Message {
			evs = append(evs, pendingEvent{corev1.EventTypeWarning, ReasonInsufficientNodes, "Place", cond.Message})
		}
		meta.SetStatusCondition(&qv.Status.Conditions, cond)
		return evs, nil
	}
	next := nextReplicaIndex(qv)
	var parts []string
	for _, node := range p.Nodes {
		name := "r" + strconv.Itoa(next)
		next++
		qv.Status.Replicas = append(qv.Status.Replicas, v1alpha1.ReplicaStatus{
			Name: name, Node: node, State: v1alpha1.ReplicaCreating,
			Message: "placed; waiting for the node agent to create it", LastTransitionTime: metav1.NewTime(cl.now),
		})
		parts = append(parts, fmt.Sprintf("%s on %s (%s=%s)", name, node, req.SpreadKey, cl.nodes[node].Labels[req.SpreadKey]))
	}
	meta.SetStatusCondition(&qv.Status.Conditions, cond)
	return []pendingEvent{{corev1.EventTypeNormal, ReasonPlaced, "Place", "placed replica(s) " + strings.Join(parts, ", ")}}, nil
}

// load counts the replicas, Stale ones not counted, of every volume
// other than self on each node.
func (r *Reconciler) load(ctx context.Context, self string) (map[string]int, error) {
	var list v1alpha1.QuorumVolumeList
	if err := r.client.List(ctx, &list); err != nil {
		return nil, fmt.Errorf("list QuorumVolumes for node load: %w", err)
	}
	load := map[string]int{}
	for i := range list.Items {
		if list.Items[i].Name == self {
			continue
		}
		for _, rep := range list.Items[i].Status.Replicas {
			if rep.State != v1alpha1.ReplicaStale {
				load[rep.Node]++
			}
		}
	}
	return load, nil
}

// nextReplicaIndex is one past the highest "rN" in the status. Names are
// never reused: a Stale replica is removed only after its replacement,
// which got a higher index, is Healthy, so the highest index stays
// listed for the volume's whole life.
func nextReplicaIndex(qv *v1alpha1.QuorumVolume) int {
	next := 0
	for _, rep := range qv.Status.Replicas {
		if s, ok := strings.CutPrefix(rep.Name, "r"); ok {
			if i, err := strconv.Atoi(s); err == nil && i >= next {
				next = i + 1
			}
		}
	}
	return next
}

// finalize holds a deleted volume until the agents have deleted its
// replica images and removed their entries, or until only replicas on
// nodes that no longer exist (nothing can delete those) are left.
func (r *Reconciler) finalize(ctx context.Context, qv *v1alpha1.QuorumVolume) (reconcile.Result, error) {
	if !controllerutil.ContainsFinalizer(qv, Finalizer) {
		return reconcile.Result{}, nil
	}
	r.metrics.set(qv.Name, v1alpha1.VolumeDeleting)
	if qv.Status.Phase != v1alpha1.VolumeDeleting {
		next := qv.DeepCopy()
		next.Status.Phase = v1alpha1.VolumeDeleting
		next.Status.Ready = next.ReadySummary()
		if err := r.client.Status().Update(ctx, next, client.FieldOwner(FieldManager)); err != nil {
			return ignoreConflict(fmt.Errorf("mark %s deleting: %w", qv.Name, err))
		}
		return reconcile.Result{}, nil
	}
	for _, rep := range qv.Status.Replicas {
		err := r.client.Get(ctx, client.ObjectKey{Name: rep.Node}, &corev1.Node{})
		if err == nil {
			// Its agent deletes the image and then the entry; that
			// status change brings the volume back here.
			return reconcile.Result{}, nil
		}
		if !kerrors.IsNotFound(err) {
			return reconcile.Result{}, fmt.Errorf("get node %s of replica %s/%s: %w", rep.Node, qv.Name, rep.Name, err)
		}
	}
	patch := client.MergeFromWithOptions(qv.DeepCopy(), client.MergeFromWithOptimisticLock{})
	controllerutil.RemoveFinalizer(qv, Finalizer)
	if err := r.client.Patch(ctx, qv, patch, client.FieldOwner(FieldManager)); err != nil {
		if kerrors.IsNotFound(err) {
			return reconcile.Result{}, nil
		}
		return ignoreConflict(fmt.Errorf("remove finalizer from %s: %w", qv.Name, err))
	}
	return reconcile.Result{}, nil
}
