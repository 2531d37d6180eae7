package v1alpha1_test

import (
	"testing"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// The API's default threshold must be the engine's, or a volume would be
// promised one durability and assembled with another.
func TestEffectiveVoteThreshold(t *testing.T) {
	for n := int32(1); n <= v1alpha1.MaxReplicas; n++ {
		spec := v1alpha1.QuorumVolumeSpec{Size: resource.MustParse("1Gi"), Replicas: n}
		if got, want := spec.EffectiveVoteThreshold(), int32(quorum.Majority(int(n))); got != want {
			t.Errorf("replicas %d: default threshold %d, engine's majority %d", n, got, want)
		}
		set := n
		spec.VoteThreshold = &set
		if got := spec.EffectiveVoteThreshold(); got != n {
			t.Errorf("replicas %d, voteThreshold %d: effective %d", n, n, got)
		}
	}
}

func TestReadySummary(t *testing.T) {
	tests := []struct {
		name   string
		states []v1alpha1.ReplicaState
		want   string
	}{
		{name: "nothing placed", want: "0/3"},
		{name: "all healthy", states: []v1alpha1.ReplicaState{v1alpha1.ReplicaHealthy, v1alpha1.ReplicaHealthy, v1alpha1.ReplicaHealthy}, want: "3/3"},
		{name: "one resyncing", states: []v1alpha1.ReplicaState{v1alpha1.ReplicaHealthy, v1alpha1.ReplicaResyncing, v1alpha1.ReplicaHealthy}, want: "2/3"},
		{name: "rebuild beside a stale one", states: []v1alpha1.ReplicaState{v1alpha1.ReplicaHealthy, v1alpha1.ReplicaHealthy, v1alpha1.ReplicaStale, v1alpha1.ReplicaCreating}, want: "2/3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			qv := &v1alpha1.QuorumVolume{Spec: v1alpha1.QuorumVolumeSpec{Replicas: 3}}
			for i, s := range tt.states {
				qv.Status.Replicas = append(qv.Status.Replicas, v1alpha1.ReplicaStatus{Name: string(rune('a' + i)), State: s})
			}
			if got := qv.ReadySummary(); got != tt.want {
				t.Errorf("ReadySummary() = %q, want %q", got, tt.want)
			}
		})
	}
}
