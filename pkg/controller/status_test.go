package controller

import (
	"testing"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

func TestPhase(t *testing.T) {
	const (
		H = v1alpha1.ReplicaHealthy
		C = v1alpha1.ReplicaCreating
		F = v1alpha1.ReplicaFaulty
		R = v1alpha1.ReplicaResyncing
		S = v1alpha1.ReplicaStale
	)
	tests := []struct {
		name   string
		states []v1alpha1.ReplicaState
		want   v1alpha1.VolumePhase
	}{
		{"nothing placed", nil, v1alpha1.VolumePending},
		{"all creating", []v1alpha1.ReplicaState{C, C, C}, v1alpha1.VolumePending},
		{"one still creating", []v1alpha1.ReplicaState{H, H, C}, v1alpha1.VolumePending},
		{"all healthy", []v1alpha1.ReplicaState{H, H, H}, v1alpha1.VolumeReady},
		{"healthy replacement beside the stale one", []v1alpha1.ReplicaState{S, H, H, H}, v1alpha1.VolumeReady},
		{"one faulty", []v1alpha1.ReplicaState{H, H, F}, v1alpha1.VolumeDegraded},
		{"one resyncing", []v1alpha1.ReplicaState{H, R, H}, v1alpha1.VolumeDegraded},
		{"replacement being created", []v1alpha1.ReplicaState{S, H, H, C}, v1alpha1.VolumeDegraded},
		{"below threshold", []v1alpha1.ReplicaState{H, F, F}, v1alpha1.VolumeFaulted},
		{"agent lost before creating", []v1alpha1.ReplicaState{F, C, C}, v1alpha1.VolumeFaulted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			qv := &v1alpha1.QuorumVolume{Spec: v1alpha1.QuorumVolumeSpec{Replicas: 3}}
			for _, s := range tt.states {
				qv.Status.Replicas = append(qv.Status.Replicas, v1alpha1.ReplicaStatus{State: s})
			}
			if got := Phase(qv); got != tt.want {
				t.Errorf("phase %s, want %s", got, tt.want)
			}
		})
	}
}
