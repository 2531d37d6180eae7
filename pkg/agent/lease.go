package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/go-logr/logr"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/controller"
)

// LeasePrefix and the node's name make the name of the node's Lease.
const LeasePrefix = "quorum-agent-"

// LeaseName is the Lease that says the agent on node runs.
func LeaseName(node string) string { return LeasePrefix + node }

// leaseKeeper creates and renews the node's Lease until its context ends,
// then stops renewing: the Lease expires leaseDuration after the last
// renewal, which is when the controller gives up on the node's replicas.
// It does not release the Lease on the way out, because the replicas are
// served until the very end of the shutdown, after the manager stopped.
type leaseKeeper struct {
	c         client.Client // writes
	r         client.Reader // reads, from the API server: no cache of Leases
	namespace string
	node      string
	duration  time.Duration
	interval  time.Duration
	log       logr.Logger
}

func (k *leaseKeeper) NeedLeaderElection() bool { return false }

func (k *leaseKeeper) Start(ctx context.Context) error {
	t := time.NewTicker(k.interval)
	defer t.Stop()
	failing := false
	for {
		err := k.renew(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			k.log.Error(err, "renew lease")
			failing = true
		case err == nil && failing:
			k.log.Info("renewing lease again", "lease", LeaseName(k.node))
			failing = false
		}
		select {
		case <-ctx.Done():
			k.log.Info("stopped renewing lease", "lease", LeaseName(k.node))
			return nil
		case <-t.C:
		}
	}
}

// renew makes the Lease held by the node, renewed now.
func (k *leaseKeeper) renew(ctx context.Context) error {
	now := metav1.NewMicroTime(time.Now())
	seconds := int32(max(1, k.duration/time.Second))
	l := &coordinationv1.Lease{}
	err := k.r.Get(ctx, client.ObjectKey{Namespace: k.namespace, Name: LeaseName(k.node)}, l)
	if apierrors.IsNotFound(err) {
		l = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: k.namespace, Name: LeaseName(k.node)},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity: &k.node, LeaseDurationSeconds: &seconds,
				AcquireTime: &now, RenewTime: &now,
			},
		}
		if err := k.c.Create(ctx, l); err != nil {
			return fmt.Errorf("create lease %s/%s: %w", k.namespace, l.Name, err)
		}
		k.log.Info("created lease", "lease", l.Name, "namespace", k.namespace)
		return nil
	}
	if err != nil {
		return fmt.Errorf("get lease %s/%s: %w", k.namespace, LeaseName(k.node), err)
	}
	// Taking over an expired Lease (this agent restarted, or its node
	// came back) is a new acquisition, as for another holder's: the
	// bookkeeping controller.RenewLease defines, judged by the
	// controller's own LeaseCurrent.
	if !controller.LeaseCurrent(l, now.Time) || l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != k.node {
		l.Spec.HolderIdentity, l.Spec.AcquireTime = &k.node, &now
		l.Spec.LeaseTransitions = ptr.To(ptr.Deref(l.Spec.LeaseTransitions, 0) + 1)
	}
	l.Spec.LeaseDurationSeconds, l.Spec.RenewTime = &seconds, &now
	if err := k.c.Update(ctx, l); err != nil {
		return fmt.Errorf("renew lease %s/%s: %w", k.namespace, l.Name, err)
	}
	return nil
}
