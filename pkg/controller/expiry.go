package controller

import (
	"context"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"

	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// leaseExpiries turns the expiry of an agent Lease, which is no watch
// event, into one: a timer per Lease, set for its expiry (plus
// expirySlack) by every event of the Lease, sends the Lease to expired
// when it runs out before the next renewal moves it. The volumes of the
// node are then reconciled once, when the node's health changed, rather
// than every volume at every expiry of its nodes' Leases, which with
// renewals every 10 s is two reconciles a minute of every idle volume.
type leaseExpiries struct {
	expired chan event.GenericEvent
	done    chan struct{} // closed when the manager stops (Start)

	mu     sync.Mutex
	timers map[client.ObjectKey]*time.Timer
}

func newLeaseExpiries() *leaseExpiries {
	return &leaseExpiries{expired: make(chan event.GenericEvent), done: make(chan struct{}), timers: map[client.ObjectKey]*time.Timer{}}
}

// Start runs until ctx ends, then stops every timer and lets go of those
// waiting to send: a manager.Runnable, on every replica, leader or not.
func (x *leaseExpiries) Start(ctx context.Context) error {
	<-ctx.Done()
	x.mu.Lock()
	defer x.mu.Unlock()
	for key := range x.timers {
		x.stopLocked(key)
	}
	close(x.done)
	return nil
}

func (x *leaseExpiries) NeedLeaderElection() bool { return false }

// track sets lease's timer for its expiry; a Lease that never was current
// (no renew time or duration) has none.
func (x *leaseExpiries) track(lease *coordinationv1.Lease) {
	key := client.ObjectKeyFromObject(lease)
	x.mu.Lock()
	defer x.mu.Unlock()
	x.stopLocked(key)
	exp, ok := contract.LeaseExpiry(lease)
	if !ok {
		return
	}
	var t *time.Timer
	t = time.AfterFunc(time.Until(exp)+expirySlack, func() {
		x.mu.Lock()
		current := x.timers[key] == t
		if current {
			delete(x.timers, key)
		}
		x.mu.Unlock()
		// A timer stopped after it started running must not send.
		if !current {
			return
		}
		select {
		case x.expired <- event.GenericEvent{Object: lease}:
		case <-x.done:
		}
	})
	x.timers[key] = t
}

// forget stops the timer of a deleted Lease; its deletion is an event of
// its own.
func (x *leaseExpiries) forget(lease client.Object) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.stopLocked(client.ObjectKeyFromObject(lease))
}

// stopLocked stops and drops key's timer; x.mu is held.
func (x *leaseExpiries) stopLocked(key client.ObjectKey) {
	if t, ok := x.timers[key]; ok {
		t.Stop()
		delete(x.timers, key)
	}
}
