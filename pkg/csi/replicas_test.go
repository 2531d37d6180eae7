package csi

import (
	"testing"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// TestChildReplica: the attached node's watcher finds the replica behind
// each engine child by its name, the URI the node staged it with, so
// every URI replicaURIs makes must lead back to its replica.
func TestChildReplica(t *testing.T) {
	s := &Node{cfg: NodeConfig{NodeName: "n2", LocalSocket: "/run/quorum-csi/agent.sock", TLSDir: "/etc/quorum/tls", TLSHostname: "n2.example"}}
	qv := &v1alpha1.QuorumVolume{Status: v1alpha1.QuorumVolumeStatus{Replicas: []v1alpha1.ReplicaStatus{
		{Name: "r0", Node: "n1", State: v1alpha1.ReplicaHealthy, Endpoint: "10.0.0.1:10809"},
		{Name: "r1", Node: "n2", State: v1alpha1.ReplicaResyncing, Endpoint: "10.0.0.2:10809"},
		{Name: "r2", Node: "n3", State: v1alpha1.ReplicaFaulty, Endpoint: "[fd00::3]:10809"},
		{Name: "r3", Node: "gone", State: v1alpha1.ReplicaStale},
	}}}
	qv.Name = "vol"
	uris := s.replicaURIs(qv)
	want := []string{"r1", "r0", "r2"} // fifo order: the local one first
	if len(uris) != len(want) {
		t.Fatalf("replica URIs %q, want %d", uris, len(want))
	}
	for i, u := range uris {
		if got := contract.ChildReplica(qv, "n2", u); got != want[i] {
			t.Errorf("child %s is replica %q, want %q", u, got, want[i])
		}
	}
	for _, child := range []string{"nbds://10.0.0.9:10809/vol", "/var/lib/image.img", "%zz"} {
		if got := contract.ChildReplica(qv, "n2", child); got != "" {
			t.Errorf("child %s is replica %q, want none", child, got)
		}
	}
}
