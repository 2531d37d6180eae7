package controller

import (
	"fmt"
	"strings"

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

// readyMessage says what keeps the volume from Ready, replica by replica.
func readyMessage(qv *v1alpha1.QuorumVolume) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s replicas healthy, voteThreshold %d", qv.ReadySummary(), qv.Spec.EffectiveVoteThreshold())
	for _, r := range qv.Status.Replicas {
		if r.State == v1alpha1.ReplicaHealthy {
			continue
		}
		fmt.Fprintf(&b, "; %s on %s: %s", r.Name, r.Node, r.State)
		if r.Message != "" {
			fmt.Fprintf(&b, " (%s)", r.Message)
		}
	}
	return b.String()
}
