package contract

import (
	"context"
	"fmt"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

const (
	// DefaultNamespace is the driver's namespace, where the agents' Leases live.
	DefaultNamespace = "quorum-csi"
	// DefaultLeaseDuration is how long an agent's Lease stays current
	// without a renewal.
	DefaultLeaseDuration = 30 * time.Second
	// DefaultRenewInterval is how often an agent renews its Lease: three
	// renewals per duration, so one slow API call does not make a healthy
	// node look dead.
	DefaultRenewInterval = 10 * time.Second
)

// leasePrefix and the node's name make the name of its agent's Lease.
const leasePrefix = "quorum-agent-"

// LeaseName is the name of the Lease through which the node agent on node
// shows that it runs.
func LeaseName(node string) string { return leasePrefix + node }

// LeaseNode is the node whose agent holds the Lease named name; false
// when name is no agent Lease's.
func LeaseNode(name string) (string, bool) { return strings.CutPrefix(name, leasePrefix) }

// RenewLease creates or renews node's agent Lease in namespace with the
// given duration (whole seconds, at least one), reading it through r
// (the node agent passes an uncached reader) and writing through w. The
// node agent renews every DefaultRenewInterval with it.
// Renewing is an update with the Lease's resourceVersion, so two agents
// claiming one node cannot silently overwrite each other; a conflict is
// returned and the next renewal retries.
func RenewLease(ctx context.Context, r client.Reader, w client.Writer, namespace, node string, duration time.Duration) error {
	secs := int32(duration / time.Second)
	if secs < 1 {
		return fmt.Errorf("renew lease of node %s: duration %v is shorter than a second", node, duration)
	}
	now := metav1.NewMicroTime(time.Now())
	lease := &coordinationv1.Lease{}
	err := r.Get(ctx, client.ObjectKey{Namespace: namespace, Name: LeaseName(node)}, lease)
	if apierrors.IsNotFound(err) {
		lease = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: LeaseName(node)},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       ptr.To(node),
				LeaseDurationSeconds: ptr.To(secs),
				AcquireTime:          &now,
				RenewTime:            &now,
			},
		}
		if err := w.Create(ctx, lease); err != nil {
			return fmt.Errorf("create lease %s/%s: %w", namespace, LeaseName(node), err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("get lease %s/%s: %w", namespace, LeaseName(node), err)
	}
	// A lease taken over after it expired (agent restart, node back) is a
	// new acquisition, which is what acquireTime and leaseTransitions
	// record for humans.
	if !LeaseCurrent(lease, now.Time) || lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity != node {
		lease.Spec.AcquireTime = &now
		lease.Spec.LeaseTransitions = ptr.To(ptr.Deref(lease.Spec.LeaseTransitions, 0) + 1)
	}
	lease.Spec.HolderIdentity = ptr.To(node)
	lease.Spec.LeaseDurationSeconds = ptr.To(secs)
	lease.Spec.RenewTime = &now
	if err := w.Update(ctx, lease); err != nil {
		return fmt.Errorf("renew lease %s/%s: %w", namespace, LeaseName(node), err)
	}
	return nil
}

// LeaseCurrent reports whether lease was renewed less than its duration
// before now.
func LeaseCurrent(lease *coordinationv1.Lease, now time.Time) bool {
	exp, ok := LeaseExpiry(lease)
	return ok && now.Before(exp)
}

// LeaseExpiry is when lease stops being current; false when it lacks a
// renew time or a duration and so never was.
func LeaseExpiry(lease *coordinationv1.Lease) (time.Time, bool) {
	if lease.Spec.RenewTime == nil || lease.Spec.LeaseDurationSeconds == nil {
		return time.Time{}, false
	}
	return lease.Spec.RenewTime.Add(time.Duration(*lease.Spec.LeaseDurationSeconds) * time.Second), true
}
