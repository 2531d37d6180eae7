package controller

import (
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// Condition types and reasons the controller sets.
const (
	// ConditionPlaced is True when spec.replicas replicas that are not
	// Stale have nodes.
	ConditionPlaced = "Placed"
	// ConditionReady is True when every replica is Healthy; otherwise its
	// reason is the phase.
	ConditionReady = contract.ConditionReady

	ReasonPlaced            = "Placed"
	ReasonInsufficientNodes = "InsufficientNodes"
	// ReasonMigrationInProgress: a replacement waits until a live
	// migration's second attachment is gone.
	ReasonMigrationInProgress = "MigrationInProgress"
	ReasonReady               = "Ready"
)

// Phase derives the volume's phase from its replicas:
//   - Ready: spec.replicas replicas are Healthy (a Stale one they replace
//     may still be listed, for the moment before it is removed);
//   - Pending: the volume is still being set up and nothing went wrong:
//     replicas are missing or Creating, none is Faulty, Resyncing or
//     Stale;
//   - otherwise Degraded when at least the effective voteThreshold are
//     Healthy (writes still succeed), Faulted when fewer are.
//
// A replacement being created beside a Stale replica is therefore
// Degraded, not Pending: the volume had all its replicas and lost one.
// Deleting is decided by the caller from the deletion timestamp.
func Phase(qv *v1alpha1.QuorumVolume) v1alpha1.VolumePhase {
	healthy, trouble := 0, false
	for _, r := range qv.Status.Replicas {
		switch r.State {
		case v1alpha1.ReplicaHealthy:
			healthy++
		case v1alpha1.ReplicaFaulty, v1alpha1.ReplicaResyncing, v1alpha1.ReplicaStale:
			trouble = true
		}
	}
	switch {
	case healthy >= int(qv.Spec.Replicas):
		return v1alpha1.VolumeReady
	case !trouble:
		return v1alpha1.VolumePending
	case healthy >= int(qv.Spec.EffectiveVoteThreshold()):
		return v1alpha1.VolumeDegraded
	default:
		return v1alpha1.VolumeFaulted
	}
}

// presentResync shows the Active attachment's engine view in the replica
// states. A replica that the engine of the Active attachment
// (engineEpoch) reports bytes out of sync for misses acknowledged
// writes: shown Healthy by its agent, it is Resyncing, which is not
// healthy, so the volume is not Ready. It is Healthy again once that
// engine reports none (its node clears the fields). Values written by
// an attachment that is gone (its node unpublished, or crashed, without
// clearing them) are cleared, so they cannot hold a volume back; those
// of a Standby are ignored (its engine does not resync). Agent Faulty and
// the controller's own states win over Resyncing. status.resyncPercent
// becomes the slowest Resyncing replica's progress.
func presentResync(qv *v1alpha1.QuorumVolume, now time.Time) []pendingEvent {
	var active v1alpha1.Attachment
	attached := map[int64]bool{}
	for _, a := range qv.Status.Attachments {
		attached[a.Epoch] = true
		if a.Role != v1alpha1.AttachmentStandby {
			active = a
		}
	}
	var evs []pendingEvent
	var slowest *int32
	for i := range qv.Status.Replicas {
		rep := &qv.Status.Replicas[i]
		if rep.EngineEpoch != 0 && !attached[rep.EngineEpoch] {
			rep.OutOfSyncBytes, rep.ResyncPercent, rep.EngineEpoch = 0, nil, 0
		}
		behind := active.Epoch != 0 && rep.EngineEpoch == active.Epoch && rep.OutOfSyncBytes > 0
		switch {
		case behind && rep.State == v1alpha1.ReplicaHealthy:
			rep.State, rep.LastTransitionTime = v1alpha1.ReplicaResyncing, metav1.NewTime(now)
			evs = append(evs, pendingEvent{corev1.EventTypeNormal, "ReplicaResyncing", "Resync",
				fmt.Sprintf("replica %s on %s misses %d bytes; the engine on node %s copies them to it", rep.Name, rep.Node, rep.OutOfSyncBytes, active.Node)})
		case !behind && rep.State == v1alpha1.ReplicaResyncing:
			rep.State, rep.LastTransitionTime = v1alpha1.ReplicaHealthy, metav1.NewTime(now)
			evs = append(evs, pendingEvent{corev1.EventTypeNormal, "ReplicaInSync", "Resync",
				fmt.Sprintf("replica %s on %s holds every acknowledged write again", rep.Name, rep.Node)})
		}
		if rep.State == v1alpha1.ReplicaResyncing {
			p := ptr.Deref(rep.ResyncPercent, 0)
			if slowest == nil || p < *slowest {
				slowest = &p
			}
		}
	}
	qv.Status.ResyncPercent = slowest
	return evs
}

// readyMessage says what keeps the volume from Ready, replica by replica.
func readyMessage(qv *v1alpha1.QuorumVolume) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s replicas healthy, voteThreshold %d", qv.ReadySummary(), qv.Spec.EffectiveVoteThreshold())
	for _, r := range qv.Status.Replicas {
		if r.State == v1alpha1.ReplicaHealthy {
			continue
		}
		fmt.Fprintf(&b, "; %s on %s: %s", r.Name, r.Node, r.State)
		if r.State == v1alpha1.ReplicaResyncing {
			fmt.Fprintf(&b, " (%d bytes out of sync, %d%% resynced)", r.OutOfSyncBytes, ptr.Deref(r.ResyncPercent, 0))
		} else if r.Message != "" {
			fmt.Fprintf(&b, " (%s)", r.Message)
		}
	}
	return b.String()
}
