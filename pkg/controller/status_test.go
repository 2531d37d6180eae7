package controller

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// Replica states, short, for the tables.
const (
	H = v1alpha1.ReplicaHealthy
	C = v1alpha1.ReplicaCreating
	F = v1alpha1.ReplicaFaulty
	R = v1alpha1.ReplicaResyncing
	S = v1alpha1.ReplicaStale
)

func TestPhase(t *testing.T) {
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

func TestPresentResync(t *testing.T) {
	active := v1alpha1.Attachment{Node: "a", Epoch: 3, Role: v1alpha1.AttachmentActive}
	standby := v1alpha1.Attachment{Node: "b", Epoch: 4, Role: v1alpha1.AttachmentStandby}
	// rep is a replica in state with the engine view of epoch: bytes out
	// of sync and percent (nil when negative).
	rep := func(state v1alpha1.ReplicaState, epoch, bytes int64, percent int32) v1alpha1.ReplicaStatus {
		r := v1alpha1.ReplicaStatus{Name: "r", Node: "n", State: state, EngineEpoch: epoch, OutOfSyncBytes: bytes}
		if percent >= 0 {
			r.ResyncPercent = ptr.To(percent)
		}
		return r
	}
	tests := []struct {
		name        string
		attachments []v1alpha1.Attachment
		in          v1alpha1.ReplicaStatus
		want        v1alpha1.ReplicaStatus
		wantPercent *int32 // status.resyncPercent
		wantEvent   string
	}{
		{"in sync", []v1alpha1.Attachment{active}, rep(H, 0, 0, -1), rep(H, 0, 0, -1), nil, ""},
		{"behind, resync not started", []v1alpha1.Attachment{active}, rep(H, 3, 4096, -1), rep(R, 3, 4096, -1), ptr.To[int32](0), "ReplicaResyncing"},
		{"resync under way", []v1alpha1.Attachment{active}, rep(R, 3, 4096, 40), rep(R, 3, 4096, 40), ptr.To[int32](40), ""},
		{"caught up", []v1alpha1.Attachment{active}, rep(R, 0, 0, -1), rep(H, 0, 0, -1), nil, "ReplicaInSync"},
		{"faulty stays faulty", []v1alpha1.Attachment{active}, rep(F, 3, 4096, -1), rep(F, 3, 4096, -1), nil, ""},
		{"a standby's view is ignored", []v1alpha1.Attachment{active, standby}, rep(H, 4, 4096, 10), rep(H, 4, 4096, 10), nil, ""},
		{"a gone attachment's view is cleared", []v1alpha1.Attachment{active}, rep(R, 2, 4096, 10), rep(H, 0, 0, -1), nil, "ReplicaInSync"},
		{"cleared without any attachment", nil, rep(H, 3, 4096, 10), rep(H, 0, 0, -1), nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			qv := &v1alpha1.QuorumVolume{Status: v1alpha1.QuorumVolumeStatus{Attachments: tt.attachments, Replicas: []v1alpha1.ReplicaStatus{tt.in}}}
			evs := presentResync(qv, time.Now())
			got := qv.Status.Replicas[0]
			got.LastTransitionTime = metav1.Time{}
			if got.State != tt.want.State || got.EngineEpoch != tt.want.EngineEpoch || got.OutOfSyncBytes != tt.want.OutOfSyncBytes || !ptr.Equal(got.ResyncPercent, tt.want.ResyncPercent) {
				t.Errorf("replica %+v, want %+v", got, tt.want)
			}
			if !ptr.Equal(qv.Status.ResyncPercent, tt.wantPercent) {
				t.Errorf("status.resyncPercent %v, want %v", ptr.Deref(qv.Status.ResyncPercent, -1), ptr.Deref(tt.wantPercent, -1))
			}
			var reasons []string
			for _, e := range evs {
				reasons = append(reasons, e.reason)
			}
			if strings.Join(reasons, ",") != tt.wantEvent {
				t.Errorf("events %v, want %q", reasons, tt.wantEvent)
			}
		})
	}
}
