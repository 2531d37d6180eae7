package controller

import (
	"context"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

func testLease(name string, renewed time.Time, secs int32) *coordinationv1.Lease {
	return &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
		Spec: coordinationv1.LeaseSpec{
			HolderIdentity: ptr.To(name), LeaseDurationSeconds: ptr.To(secs),
			RenewTime: ptr.To(metav1.NewMicroTime(renewed)),
		},
	}
}

// TestLeaseExpiries: a Lease that runs out is sent once, at its expiry;
// one renewed in time, deleted, or never current is not; and nothing is
// sent once the manager stopped.
func TestLeaseExpiries(t *testing.T) {
	x := newLeaseExpiries()
	ctx, cancel := context.WithCancel(t.Context())
	stopped := make(chan error, 1)
	go func() { stopped <- x.Start(ctx) }()

	now := time.Now()
	// Expires in about 1 s (the Lease's unit is a second).
	x.track(testLease("runs-out", now, 1))
	// Would expire in 1 s, but is renewed for an hour.
	x.track(testLease("renewed", now, 1))
	x.track(testLease("renewed", now, 3600))
	// Would expire in 1 s, but is deleted.
	x.track(testLease("deleted", now, 1))
	x.forget(testLease("deleted", now, 1))
	// Never current: no renew time.
	x.track(&coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "never"}})

	select {
	case ev := <-x.expired:
		if ev.Object.GetName() != "runs-out" {
			t.Fatalf("%s sent as expired, want runs-out", ev.Object.GetName())
		}
		if d := time.Since(now); d < time.Second {
			t.Errorf("sent %v after the renewal, before the Lease expired", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("runs-out not sent within 10 s")
	}
	select {
	case ev := <-x.expired:
		t.Fatalf("%s sent as expired as well", ev.Object.GetName())
	case <-time.After(1500 * time.Millisecond):
	}

	// Once stopped, a timer that runs out does not wait to send.
	x.track(testLease("after-stop", time.Now(), 1))
	cancel()
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	x.mu.Lock()
	n := len(x.timers)
	x.mu.Unlock()
	if n != 0 {
		t.Errorf("%d timers left after Start returned", n)
	}
}
