package controller

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	kerrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// ResizerName names the resizer's controller and reports its Events.
const ResizerName = "quorum-resizer"

// The resizer's Event reasons on PVCs are external-resizer's, so that
// people and tools reading `kubectl describe pvc` find what they know.
// VolumeResizeSuccessful never occurs: this driver always needs node
// expansion, and the kubelet reports FileSystemResizeSuccessful.
const (
	ReasonResizing                 = "Resizing"
	ReasonVolumeResizeFailed       = "VolumeResizeFailed"
	ReasonFileSystemResizeRequired = "FileSystemResizeRequired"
)

// infeasibleRetry is how long an expansion that failed as infeasible
// (INVALID_ARGUMENT, OUT_OF_RANGE, NOT_FOUND) waits before it is tried
// again with the same size, as external-resizer's slow set does (its
// --retry-interval-max, 5 minutes). A new size, the user's way out,
// is tried at once.
const infeasibleRetry = 5 * time.Minute

// indexVolumeHandle indexes this driver's PVs by CSI volume handle, the
// QuorumVolume's name, to find the claim a QuorumVolume change concerns.
const indexVolumeHandle = "spec.csi.volumeHandle"

// VolumeExpander is the volume expansion the resizer calls: the CSI
// Controller service's (csi.Controller.ExpandVolume), in process, so
// that it takes the same per-volume lock as the calls the sidecars make.
// ExpandVolume grows volume to at least bytes and returns its size; its
// error carries the gRPC code the CSI call would have returned
// (status.Code), by which the resizer retries as external-resizer does.
type VolumeExpander interface {
	ExpandVolume(ctx context.Context, volume string, bytes int64) (int64, error)
}

// Resizer expands bound PVCs of this driver when their storage request
// grows: the part of a PVC expansion that external-resizer does for
// other drivers (with RecoverVolumeExpansionFailure, GA in Kubernetes
// 1.37), for a driver with OFFLINE expansion that always needs node
// expansion. One step per reconcile of a claim whose request exceeds
// status.capacity:
//
//  1. status.allocatedResources[storage] = the size to expand to,
//     allocatedResourceStatuses[storage] = ControllerResizeInProgress,
//     condition Resizing; Event Resizing;
//  2. ControllerExpandVolume grows the QuorumVolume's spec.size;
//  3. the PV's spec.capacity becomes the size it returned;
//  4. allocatedResourceStatuses[storage] = NodeResizePending, condition
//     FileSystemResizePending; Event FileSystemResizeRequired.
//
// The kubelet takes over from there: at the volume's next stage it sees
// the PV larger than status.capacity and a NodeResizePending claim,
// calls NodeExpandVolume with allocatedResources and then sets
// status.capacity and clears the status and the resize conditions
// (pkg/volume/util/operationexecutor/node_expander.go).
//
// A volume that is published is not expanded (OFFLINE): a Warning Event
// VolumeResizeFailed says the claim waits for it to be unpublished, and
// the claim is reconciled again when its QuorumVolume loses its last
// attachment. A failed expansion is a Warning Event VolumeResizeFailed;
// an infeasible one (INVALID_ARGUMENT, OUT_OF_RANGE, NOT_FOUND) also sets
// ControllerResizeInfeasible and the condition ControllerResizeError and
// is retried with the same size only after infeasibleRetry; another
// final error sets ControllerResizeError and is retried with backoff,
// with the user's current request (recovery); a transient one is retried
// with backoff with the size already allocated.
type Resizer struct {
	client   client.Client
	expander VolumeExpander
	recorder events.EventRecorder

	mu sync.Mutex
	// finalErrors holds claims whose last expansion failed with a final
	// error: only then may a retry use a smaller request than the size
	// allocated, since the volume is sure not to be growing to it.
	finalErrors map[types.NamespacedName]bool
	// slow holds claims whose last expansion was infeasible, with the
	// time before which the same size is not tried again.
	slow map[types.NamespacedName]time.Time
}

// NewResizer returns a Resizer that reads and writes claims and volumes
// through c (normally the manager's cached client), expands with x and
// records Events with rec.
func NewResizer(c client.Client, x VolumeExpander, rec events.EventRecorder) *Resizer {
	return &Resizer{client: c, expander: x, recorder: rec,
		finalErrors: map[types.NamespacedName]bool{}, slow: map[types.NamespacedName]time.Time{}}
}

// SetupWithManager registers the resizer. Besides claims it watches
// PVs (mapped to their claim) and QuorumVolumes that lose their last
// attachment (mapped through the PV index to their claim), which is
// when a claim waiting for the volume to be unpublished can proceed.
func (r *Resizer) SetupWithManager(ctx context.Context, mgr ctrl.Manager) error {
	err := mgr.GetFieldIndexer().IndexField(ctx, &corev1.PersistentVolume{}, indexVolumeHandle, func(o client.Object) []string {
		if h := quorumVolumeHandle(o.(*corev1.PersistentVolume)); h != "" {
			return []string{h}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("index PVs by volume handle: %w", err)
	}
	err = ctrl.NewControllerManagedBy(mgr).
		Named(ResizerName).
		For(&corev1.PersistentVolumeClaim{}).
		Watches(&corev1.PersistentVolume{}, handler.EnqueueRequestsFromMapFunc(claimOfVolume)).
		Watches(&v1alpha1.QuorumVolume{}, handler.EnqueueRequestsFromMapFunc(r.claimsOfQuorumVolume),
			builder.WithPredicates(unpublished())).
		Complete(r)
	if err != nil {
		return fmt.Errorf("set up PVC resizer: %w", err)
	}
	return nil
}

// quorumVolumeHandle is the QuorumVolume behind a PV of this driver, or "".
func quorumVolumeHandle(pv *corev1.PersistentVolume) string {
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != contract.DriverName {
		return ""
	}
	return pv.Spec.CSI.VolumeHandle
}

func claimOfVolume(_ context.Context, o client.Object) []reconcile.Request {
	ref := o.(*corev1.PersistentVolume).Spec.ClaimRef
	if ref == nil {
		return nil
	}
	return []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: ref.Namespace, Name: ref.Name}}}
}

func (r *Resizer) claimsOfQuorumVolume(ctx context.Context, o client.Object) []reconcile.Request {
	var pvs corev1.PersistentVolumeList
	if err := r.client.List(ctx, &pvs, client.MatchingFields{indexVolumeHandle: o.GetName()}); err != nil {
		logf.FromContext(ctx).Error(err, "list PVs of QuorumVolume", "volume", o.GetName())
		return nil
	}
	var reqs []reconcile.Request
	for i := range pvs.Items {
		reqs = append(reqs, claimOfVolume(ctx, &pvs.Items[i])...)
	}
	return reqs
}

// unpublished passes QuorumVolume updates that remove the last attachment.
func unpublished() predicate.Predicate {
	return predicate.Funcs{
		CreateFunc:  func(event.CreateEvent) bool { return false },
		DeleteFunc:  func(event.DeleteEvent) bool { return false },
		GenericFunc: func(event.GenericEvent) bool { return false },
		UpdateFunc: func(e event.UpdateEvent) bool {
			before, after := e.ObjectOld.(*v1alpha1.QuorumVolume), e.ObjectNew.(*v1alpha1.QuorumVolume)
			return len(before.Status.Attachments) > 0 && len(after.Status.Attachments) == 0
		},
	}
}

// Reconcile takes one claim one expansion further (see Resizer).
func (r *Resizer) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	log := logf.FromContext(ctx)
	pvc := &corev1.PersistentVolumeClaim{}
	if err := r.client.Get(ctx, req.NamespacedName, pvc); err != nil {
		if kerrors.IsNotFound(err) {
			r.clearFailure(req.NamespacedName)
			return reconcile.Result{}, nil
		}
		return reconcile.Result{}, fmt.Errorf("get PVC %s: %w", req.NamespacedName, err)
	}
	if !needsResize(pvc) {
		return reconcile.Result{}, nil
	}
	pv := &corev1.PersistentVolume{}
	if err := r.client.Get(ctx, client.ObjectKey{Name: pvc.Spec.VolumeName}, pv); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(fmt.Errorf("get PV %s of PVC %s: %w", pvc.Spec.VolumeName, req.NamespacedName, err))
	}
	handle := quorumVolumeHandle(pv)
	if ref := pv.Spec.ClaimRef; handle == "" || ref == nil || ref.UID != pvc.UID || ref.Namespace != pvc.Namespace {
		return reconcile.Result{}, nil
	}
	size, ok := resizeTarget(pvc, pv, r.finalError(req.NamespacedName))
	if !ok {
		return reconcile.Result{}, nil
	}
	log = log.WithValues("pv", pv.Name, "volume", handle, "size", size.String())
	allocated, hasAllocated := pvc.Status.AllocatedResources[corev1.ResourceStorage]
	again := hasAllocated && allocated.Cmp(size) == 0
	if again && pvc.Status.AllocatedResourceStatuses[corev1.ResourceStorage] == corev1.PersistentVolumeClaimControllerResizeInfeasible {
		if wait := r.slowUntil(req.NamespacedName); wait > 0 {
			log.V(1).Info("not retrying an infeasible expansion yet", "after", wait)
			return reconcile.Result{RequeueAfter: wait}, nil
		}
	}

	qv := &v1alpha1.QuorumVolume{}
	if err := r.client.Get(ctx, client.ObjectKey{Name: handle}, qv); err == nil && len(qv.Status.Attachments) > 0 {
		r.waitForUnpublish(pvc, pv, strings.Join(contract.AttachedNodes(qv), " and "))
		return reconcile.Result{}, nil
	} else if client.IgnoreNotFound(err) != nil {
		return reconcile.Result{}, fmt.Errorf("get QuorumVolume %s: %w", handle, err)
	}

	pvc, err := r.markControllerResizeInProgress(ctx, pvc, size, !again)
	if err != nil {
		return reconcile.Result{}, err
	}
	r.recorder.Eventf(pvc, pv, corev1.EventTypeNormal, ReasonResizing, "Resize", "quorum-resizer is resizing volume %s", pv.Name)
	got, err := r.expander.ExpandVolume(ctx, handle, size.Value())
	if err != nil {
		return r.expansionFailed(ctx, pvc, pv, err)
	}
	r.clearFailure(req.NamespacedName)
	capacity := *resource.NewQuantity(got, resource.BinarySI)
	if err := r.setVolumeCapacity(ctx, pv, capacity); err != nil {
		return reconcile.Result{}, err
	}
	if err := r.markForPendingNodeExpansion(ctx, pvc); err != nil {
		return reconcile.Result{}, err
	}
	log.Info("volume expanded; the kubelet grows the filesystem at the next stage", "capacity", capacity.String())
	return reconcile.Result{}, nil
}

// needsResize says whether a bound claim asks for more than it has, the
// only claims external-resizer acts on: a request at or below
// status.capacity, a shrink included, is left alone.
func needsResize(pvc *corev1.PersistentVolumeClaim) bool {
	if pvc.Status.Phase != corev1.ClaimBound || pvc.Spec.VolumeName == "" {
		return false
	}
	request, capacity := pvc.Spec.Resources.Requests[corev1.ResourceStorage], pvc.Status.Capacity[corev1.ResourceStorage]
	return request.Cmp(capacity) > 0
}

// resizeTarget is the size to expand a claim's volume to, or false when
// the claim waits for the kubelet or nothing is to be done. It is
// external-resizer's expandAndRecover decision: an expansion under way
// finishes at its allocated size before a new request is taken up,
// except after a final error (finalError) or an infeasible one, when
// the user's current request, possibly lowered, is what counts.
func resizeTarget(pvc *corev1.PersistentVolumeClaim, pv *corev1.PersistentVolume, finalError bool) (resource.Quantity, bool) {
	request := pvc.Spec.Resources.Requests[corev1.ResourceStorage]
	pvSize := pv.Spec.Capacity[corev1.ResourceStorage]
	allocated, hasAllocated := pvc.Status.AllocatedResources[corev1.ResourceStorage]
	orRequest := func() resource.Quantity {
		if hasAllocated {
			return allocated
		}
		return request
	}
	st := pvc.Status.AllocatedResourceStatuses[corev1.ResourceStorage]
	if pvSize.Cmp(request) < 0 {
		switch st {
		case corev1.PersistentVolumeClaimNodeResizeInfeasible:
			return orRequest(), true
		case corev1.PersistentVolumeClaimNodeResizePending, corev1.PersistentVolumeClaimNodeResizeInProgress:
			size := orRequest()
			return size, pvSize.Cmp(size) < 0
		case corev1.PersistentVolumeClaimControllerResizeInProgress:
			if finalError {
				return request, true
			}
			return orRequest(), true
		}
		return request, true
	}
	// The PV already has the request: the kubelet still has to finish,
	// or the claim's status was not written after the expansion.
	switch st {
	case corev1.PersistentVolumeClaimNodeResizePending, corev1.PersistentVolumeClaimNodeResizeInProgress:
		return resource.Quantity{}, false
	case corev1.PersistentVolumeClaimNodeResizeInfeasible,
		corev1.PersistentVolumeClaimControllerResizeInProgress,
		corev1.PersistentVolumeClaimControllerResizeInfeasible:
		return orRequest(), true
	}
	if hasAllocated {
		return allocated, true
	}
	if hasCondition(pvc, corev1.PersistentVolumeClaimFileSystemResizePending) {
		return resource.Quantity{}, false
	}
	return request, true
}

func hasCondition(pvc *corev1.PersistentVolumeClaim, t corev1.PersistentVolumeClaimConditionType) bool {
	for _, c := range pvc.Status.Conditions {
		if c.Type == t && c.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}

// waitForUnpublish records that the claim waits for its volume to be
// unpublished, with external-resizer's reason and wording for a driver
// that expands offline only.
func (r *Resizer) waitForUnpublish(pvc *corev1.PersistentVolumeClaim, pv *corev1.PersistentVolume, nodes string) {
	r.recorder.Eventf(pvc, pv, corev1.EventTypeWarning, ReasonVolumeResizeFailed, "Resize",
		"Unable to expand %s/%s because CSI driver %s only supports offline expansion and volume is currently in-use (published to %s); waiting for it to be unpublished",
		pvc.Namespace, pvc.Name, contract.DriverName, nodes)
}

// expansionFailed records a failed expansion and says when to retry,
// by the failure's CSI code as external-resizer sorts them.
func (r *Resizer) expansionFailed(ctx context.Context, pvc *corev1.PersistentVolumeClaim, pv *corev1.PersistentVolume, err error) (reconcile.Result, error) {
	key := client.ObjectKeyFromObject(pvc)
	err = fmt.Errorf("expand volume %s of PVC %s: %w", pv.Name, key, err)
	code := status.Code(err)
	if code == codes.FailedPrecondition {
		// Published since the check above; ControllerExpandVolume saw it
		// atomically. The claim keeps its allocated size and proceeds when
		// the volume is unpublished.
		r.waitForUnpublish(pvc, pv, "a node")
		return reconcile.Result{}, nil
	}
	r.recorder.Eventf(pvc, pv, corev1.EventTypeWarning, ReasonVolumeResizeFailed, "Resize", "%v", err)
	switch code {
	case codes.Canceled, codes.DeadlineExceeded, codes.Unavailable, codes.ResourceExhausted, codes.Aborted:
		// The expansion may still be under way: retry the allocated size.
		r.clearFailure(key)
		return reconcile.Result{}, err
	case codes.InvalidArgument, codes.OutOfRange, codes.NotFound:
		r.failedFinally(key, true)
		if merr := r.markControllerResizeFailed(ctx, pvc, err, true); merr != nil {
			return reconcile.Result{}, merr
		}
		logf.FromContext(ctx).Info("expansion infeasible", "error", err.Error(), "retryAfter", infeasibleRetry)
		return reconcile.Result{RequeueAfter: infeasibleRetry}, nil
	}
	r.failedFinally(key, false)
	if merr := r.markControllerResizeFailed(ctx, pvc, err, false); merr != nil {
		return reconcile.Result{}, merr
	}
	return reconcile.Result{}, err
}

// markControllerResizeInProgress records size as allocated and, unless
// this is a retry of the same size (newStatus false), the status
// ControllerResizeInProgress and the condition Resizing, replacing older
// resize conditions.
func (r *Resizer) markControllerResizeInProgress(ctx context.Context, pvc *corev1.PersistentVolumeClaim, size resource.Quantity, newStatus bool) (*corev1.PersistentVolumeClaim, error) {
	next := pvc.DeepCopy()
	resizing := corev1.PersistentVolumeClaimCondition{Type: corev1.PersistentVolumeClaimResizing, Status: corev1.ConditionTrue, LastTransitionTime: metav1.Now()}
	next.Status.Conditions = mergeResizeConditions(next.Status.Conditions, !newStatus, resizing)
	if newStatus {
		setResourceStatus(next, corev1.PersistentVolumeClaimControllerResizeInProgress)
	}
	if next.Status.AllocatedResources == nil {
		next.Status.AllocatedResources = corev1.ResourceList{}
	}
	next.Status.AllocatedResources[corev1.ResourceStorage] = size
	if err := r.patchStatus(ctx, pvc, next); err != nil {
		return nil, fmt.Errorf("mark PVC %s/%s as resizing: %w", pvc.Namespace, pvc.Name, err)
	}
	return next, nil
}

// markForPendingNodeExpansion hands the claim to the kubelet.
func (r *Resizer) markForPendingNodeExpansion(ctx context.Context, pvc *corev1.PersistentVolumeClaim) error {
	next := pvc.DeepCopy()
	pending := corev1.PersistentVolumeClaimCondition{
		Type: corev1.PersistentVolumeClaimFileSystemResizePending, Status: corev1.ConditionTrue, LastTransitionTime: metav1.Now(),
		Message: "Waiting for user to (re-)start a pod to finish file system resize of volume on node.",
	}
	next.Status.Conditions = mergeResizeConditions(next.Status.Conditions, true, pending)
	setResourceStatus(next, corev1.PersistentVolumeClaimNodeResizePending)
	if err := r.patchStatus(ctx, pvc, next); err != nil {
		return fmt.Errorf("mark PVC %s/%s as waiting for node expansion: %w", pvc.Namespace, pvc.Name, err)
	}
	r.recorder.Eventf(next, nil, corev1.EventTypeNormal, ReasonFileSystemResizeRequired, "Resize", "Require file system resize of volume on node")
	return nil
}

// markControllerResizeFailed adds the condition ControllerResizeError
// and, for an infeasible expansion, the status ControllerResizeInfeasible.
func (r *Resizer) markControllerResizeFailed(ctx context.Context, pvc *corev1.PersistentVolumeClaim, cause error, infeasible bool) error {
	next := pvc.DeepCopy()
	failed := corev1.PersistentVolumeClaimCondition{
		Type: corev1.PersistentVolumeClaimControllerResizeError, Status: corev1.ConditionTrue, LastTransitionTime: metav1.Now(),
		Message: fmt.Sprintf("failed to expand pvc with %v", cause),
	}
	next.Status.Conditions = mergeResizeConditions(next.Status.Conditions, true, failed)
	if infeasible {
		setResourceStatus(next, corev1.PersistentVolumeClaimControllerResizeInfeasible)
	}
	if err := r.patchStatus(ctx, pvc, next); err != nil {
		return fmt.Errorf("mark PVC %s/%s as failed to expand: %w", pvc.Namespace, pvc.Name, err)
	}
	return nil
}

// patchStatus writes next's status over pvc's, refused if pvc is stale,
// so a decision made on an old claim is never recorded.
func (r *Resizer) patchStatus(ctx context.Context, pvc, next *corev1.PersistentVolumeClaim) error {
	return r.client.Status().Patch(ctx, next, client.MergeFromWithOptions(pvc, client.MergeFromWithOptimisticLock{}))
}

// setVolumeCapacity sets the PV's spec.capacity, which the kubelet
// compares with the claim's status.capacity to start node expansion.
func (r *Resizer) setVolumeCapacity(ctx context.Context, pv *corev1.PersistentVolume, capacity resource.Quantity) error {
	if have := pv.Spec.Capacity[corev1.ResourceStorage]; have.Cmp(capacity) == 0 {
		return nil
	}
	next := pv.DeepCopy()
	if next.Spec.Capacity == nil {
		next.Spec.Capacity = corev1.ResourceList{}
	}
	next.Spec.Capacity[corev1.ResourceStorage] = capacity
	if err := r.client.Patch(ctx, next, client.MergeFromWithOptions(pv, client.MergeFromWithOptimisticLock{})); err != nil {
		return fmt.Errorf("set capacity of PV %s to %s: %w", pv.Name, capacity.String(), err)
	}
	return nil
}

func setResourceStatus(pvc *corev1.PersistentVolumeClaim, s corev1.ClaimResourceStatus) {
	if pvc.Status.AllocatedResourceStatuses == nil {
		pvc.Status.AllocatedResourceStatuses = map[corev1.ResourceName]corev1.ClaimResourceStatus{}
	}
	pvc.Status.AllocatedResourceStatuses[corev1.ResourceStorage] = s
}

// resizeConditions are the claim conditions of an expansion; others are
// never touched.
var resizeConditions = map[corev1.PersistentVolumeClaimConditionType]bool{
	corev1.PersistentVolumeClaimResizing:                true,
	corev1.PersistentVolumeClaimFileSystemResizePending: true,
	corev1.PersistentVolumeClaimControllerResizeError:   true,
	corev1.PersistentVolumeClaimNodeResizeError:         true,
}

// mergeResizeConditions sets c among the conditions, replacing one of
// its type, and keeps the other resize conditions only when keepOld.
func mergeResizeConditions(old []corev1.PersistentVolumeClaimCondition, keepOld bool, c corev1.PersistentVolumeClaimCondition) []corev1.PersistentVolumeClaimCondition {
	var out []corev1.PersistentVolumeClaimCondition
	for _, o := range old {
		switch {
		case o.Type == c.Type:
		case !resizeConditions[o.Type] || keepOld:
			out = append(out, o)
		}
	}
	return append(out, c)
}

func (r *Resizer) finalError(key types.NamespacedName) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.finalErrors[key]
}

// slowUntil is how long an infeasible claim still waits before its size
// is tried again; a claim found infeasible by an earlier run of the
// controller starts waiting now.
func (r *Resizer) slowUntil(key types.NamespacedName) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	until, ok := r.slow[key]
	if !ok {
		until = time.Now().Add(infeasibleRetry)
		r.slow[key] = until
	}
	return time.Until(until)
}

func (r *Resizer) failedFinally(key types.NamespacedName, infeasible bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.finalErrors[key] = true
	if infeasible {
		r.slow[key] = time.Now().Add(infeasibleRetry)
	} else {
		delete(r.slow, key)
	}
}

// clearFailure forgets a claim's final or infeasible failure: after a
// success, after a transient failure (the expansion may then be under
// way) and once the claim is gone.
func (r *Resizer) clearFailure(key types.NamespacedName) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.finalErrors, key)
	delete(r.slow, key)
}
