package agent

import (
	"context"
	"time"

	"github.com/go-logr/logr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// Defaults of the contract with the controller, which defines them.
const (
	DefaultNamespace     = contract.DefaultNamespace
	DefaultLeaseDuration = contract.DefaultLeaseDuration
	DefaultRenewInterval = contract.DefaultRenewInterval
)

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
			k.log.Info("renewing lease again", "lease", contract.LeaseName(k.node))
			failing = false
		}
		select {
		case <-ctx.Done():
			k.log.Info("stopped renewing lease", "lease", contract.LeaseName(k.node))
			return nil
		case <-t.C:
		}
	}
}

// renew makes the Lease held by the node, renewed now.
func (k *leaseKeeper) renew(ctx context.Context) error {
	return contract.RenewLease(ctx, k.r, k.c, k.namespace, k.node, k.duration)
}
