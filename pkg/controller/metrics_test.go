package controller

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// TestPhaseMetrics: each volume has one quorum_volume_phase series, its
// current phase's, and none once it is gone; quorum_volumes counts them.
func TestPhaseMetrics(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	m, err := newPhaseMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.set("a", v1alpha1.VolumePending)
	m.set("b", v1alpha1.VolumeReady)
	m.set("a", v1alpha1.VolumeDegraded)
	m.set("a", v1alpha1.VolumeDegraded)
	want := `
# HELP quorum_volume_phase 1 for the QuorumVolume's phase (Pending, Ready, Degraded, Faulted, Deleting), as the controller last reconciled it; one series per volume.
# TYPE quorum_volume_phase gauge
quorum_volume_phase{phase="Degraded",volume="a"} 1
quorum_volume_phase{phase="Ready",volume="b"} 1
# HELP quorum_volumes QuorumVolumes per phase, as the controller last reconciled them.
# TYPE quorum_volumes gauge
quorum_volumes{phase="Degraded"} 1
quorum_volumes{phase="Deleting"} 0
quorum_volumes{phase="Faulted"} 0
quorum_volumes{phase="Pending"} 0
quorum_volumes{phase="Ready"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "quorum_volume_phase", "quorum_volumes"); err != nil {
		t.Error(err)
	}
	m.set("a", "")
	if n := testutil.CollectAndCount(m.volume); n != 1 {
		t.Errorf("%d quorum_volume_phase series after a is gone, want 1 (b's)", n)
	}
}

// TestLeaseCollector: a gauge per node with an agent Lease and a Node,
// 1 only while the node itself holds the Lease and it is current.
func TestLeaseCollector(t *testing.T) {
	now := time.Now()
	lease := func(holder string, renewed time.Time) *coordinationv1.Lease {
		return &coordinationv1.Lease{Spec: coordinationv1.LeaseSpec{
			HolderIdentity:       ptr.To(holder),
			RenewTime:            &metav1.MicroTime{Time: renewed},
			LeaseDurationSeconds: ptr.To[int32](30),
		}}
	}
	cl := &cluster{now: now,
		nodes: map[string]*corev1.Node{"live": {}, "expired": {}, "other": {}},
		leases: map[string]*coordinationv1.Lease{
			"live":    lease("live", now.Add(-5*time.Second)),
			"expired": lease("expired", now.Add(-time.Minute)),
			"other":   lease("someone", now),
			"gone":    lease("gone", now), // its Node was deleted
		},
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(newLeaseCollector(func(context.Context) (*cluster, error) { return cl, nil }))
	want := `
# HELP quorum_agent_lease_current 1 while the node's agent holds its Lease and renews it, 0 once the Lease expired or another holds it; for each node with an agent Lease, as the controller sees them.
# TYPE quorum_agent_lease_current gauge
quorum_agent_lease_current{node="expired"} 0
quorum_agent_lease_current{node="live"} 1
quorum_agent_lease_current{node="other"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Error(err)
	}

	// The cache cannot be read: no series, and the scrape still works.
	failing := prometheus.NewPedanticRegistry()
	failing.MustRegister(newLeaseCollector(func(context.Context) (*cluster, error) { return nil, errors.New("cache not started") }))
	if n, err := testutil.GatherAndCount(failing); err != nil || n != 0 {
		t.Errorf("with the cache unreadable: %d series, error %v; want none and no error", n, err)
	}
}
