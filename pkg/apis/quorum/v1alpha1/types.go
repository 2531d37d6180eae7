package v1alpha1

import (
	"fmt"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// MaxReplicas bounds spec.replicas. Every write waits for voteThreshold
// replicas and goes to all of them, so beyond a handful more copies buy
// little safety for a lot of network traffic; the bound also keeps the CEL
// rules over status.replicas cheap enough for the API server's cost limit.
const MaxReplicas = 7

// ReadPattern chooses how reads are served.
// +kubebuilder:validation:Enum=fifo;quorum
type ReadPattern string

const (
	// ReadPatternFIFO reads one healthy replica, the node-local one first,
	// and the next one on error. Silent corruption is found by the scrub.
	ReadPatternFIFO ReadPattern = "fifo"
	// ReadPatternQuorum reads every replica and returns the data that at
	// least voteThreshold of them agree on; fewer is an I/O error.
	ReadPatternQuorum ReadPattern = "quorum"
)

// QuorumVolumeSpec is what the user asks for.
//
// What can change after creation, and why:
//   - size: only grows (expansion); shrinking would cut data off.
//   - replicas and the effective voteThreshold: immutable. The threshold is
//     the volume's durability promise (how many copies hold every
//     acknowledged write) and it only holds if it never changes under
//     data that was written with another one; adding or removing replicas
//     is a reconfiguration the controller does not do. Relaxing this later
//     is compatible, tightening it would not be.
//   - placement.spreadKey: immutable, because the replicas already placed
//     were spread by it; under another key a rebuild could put two of them
//     in one failure domain without anything noticing.
//   - readPattern and rewriteCorrupted: take effect at the next attach.
//   - placement.nodeSelector and placement.preferredNode: apply to replicas
//     placed from then on (rebuilds), not to those already placed.
//
// +kubebuilder:validation:XValidation:rule="!has(self.voteThreshold) || self.voteThreshold <= self.replicas",message="voteThreshold must not exceed replicas"
// +kubebuilder:validation:XValidation:rule="!has(self.rewriteCorrupted) || !self.rewriteCorrupted || self.readPattern == 'quorum'",message="rewriteCorrupted needs readPattern quorum: fifo reads do not vote, so there is no winner to rewrite with"
// +kubebuilder:validation:XValidation:rule="self.replicas != oldSelf.replicas || (has(self.voteThreshold) ? self.voteThreshold : self.replicas / 2 + 1) == (has(oldSelf.voteThreshold) ? oldSelf.voteThreshold : oldSelf.replicas / 2 + 1)",message="the effective voteThreshold is immutable"
type QuorumVolumeSpec struct {
	// Size is the volume's size in bytes; it can grow, never shrink.
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).isGreaterThan(quantity('0'))",message="size must be greater than zero"
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).isInteger()",message="size must be a whole number of bytes"
	// +kubebuilder:validation:XValidation:rule="quantity(string(self)).compareTo(quantity(string(oldSelf))) >= 0",message="size cannot shrink"
	Size resource.Quantity `json:"size"`

	// Replicas is how many copies of the data exist, each on its own node
	// (see placement.spreadKey). Immutable.
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=7
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="replicas is immutable"
	Replicas int32 `json:"replicas"`

	// VoteThreshold is how many replicas must succeed for a write or flush
	// to succeed, and must agree for a quorum read to return data;
	// 1 <= voteThreshold <= replicas. Unset means a majority,
	// replicas/2 + 1, as in QEMU's quorum driver (EffectiveVoteThreshold).
	// The effective value is immutable.
	// +optional
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=7
	VoteThreshold *int32 `json:"voteThreshold,omitempty"`

	// ReadPattern is fifo (read one replica, the local one first) or
	// quorum (read all and vote). fifo is the default because it keeps
	// reads node-local and as fast as one disk, while the background scrub
	// still finds and repairs silent corruption.
	// +kubebuilder:default=fifo
	// +optional
	ReadPattern ReadPattern `json:"readPattern,omitempty"`

	// RewriteCorrupted rewrites replicas that lose a quorum read's vote
	// with the winning data before the read returns. Needs readPattern
	// quorum.
	// +optional
	RewriteCorrupted bool `json:"rewriteCorrupted,omitempty"`

	// Placement says on which nodes replicas may be put.
	// +kubebuilder:default={}
	// +optional
	Placement Placement `json:"placement,omitempty"`
}

// Placement constrains where the controller puts replicas.
type Placement struct {
	// NodeSelector restricts replicas to nodes with all of these labels.
	// +optional
	// +kubebuilder:validation:MaxProperties=64
	NodeSelector map[string]string `json:"nodeSelector,omitempty"`

	// SpreadKey is a node label; no two replicas go to nodes with the same
	// value of it. The default puts every replica on its own node; a zone
	// label spreads them over zones. Immutable.
	// +kubebuilder:default="kubernetes.io/hostname"
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=317
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="placement.spreadKey is immutable"
	// +optional
	SpreadKey string `json:"spreadKey,omitempty"`

	// PreferredNode gets one replica if it qualifies: the node the
	// consumer runs on (WaitForFirstConsumer), so fifo reads stay local.
	// +optional
	// +kubebuilder:validation:MaxLength=253
	PreferredNode string `json:"preferredNode,omitempty"`
}

// VolumePhase summarises the volume's health.
// +kubebuilder:validation:Enum=Pending;Ready;Degraded;Faulted;Deleting
type VolumePhase string

const (
	// VolumePending: not every replica has been placed and created yet.
	VolumePending VolumePhase = "Pending"
	// VolumeReady: every replica is Healthy, so each holds every
	// acknowledged write (none is Resyncing).
	VolumeReady VolumePhase = "Ready"
	// VolumeDegraded: writes still reach voteThreshold replicas, but some
	// replica is not Healthy.
	VolumeDegraded VolumePhase = "Degraded"
	// VolumeFaulted: fewer than voteThreshold replicas are Healthy, so
	// writes fail.
	VolumeFaulted VolumePhase = "Faulted"
	// VolumeDeleting: the replicas are being removed.
	VolumeDeleting VolumePhase = "Deleting"
)

// ReplicaState is one replica's health: Creating, Faulty (its agent's
// Lease expired), Stale and Resyncing as the controller sets them,
// Healthy and Faulty as its node agent reports them (package contract's
// doc says who writes what).
// +kubebuilder:validation:Enum=Creating;Healthy;Faulty;Resyncing;Stale
type ReplicaState string

const (
	// ReplicaCreating: placed on a node, its image is being made.
	ReplicaCreating ReplicaState = "Creating"
	// ReplicaHealthy: its node agent has the image (at spec.size) and
	// serves it, and the Active attachment's engine, if any, reports no
	// byte out of sync: it holds every acknowledged write.
	ReplicaHealthy ReplicaState = "Healthy"
	// ReplicaFaulty: failed I/O; writes go on without it and are tracked
	// so that a resync copies only what it missed.
	ReplicaFaulty ReplicaState = "Faulty"
	// ReplicaResyncing: served by its node agent, but the Active
	// attachment's engine reports bytes it misses (outOfSyncBytes), which
	// the engine copies to it while the volume serves I/O. The controller
	// presents it, from the engine's report, over the agent's Healthy;
	// the replica counts as in sync again once the engine reports 0.
	ReplicaResyncing ReplicaState = "Resyncing"
	// ReplicaStale: its node is gone or it missed writes that are no
	// longer tracked; it is rebuilt elsewhere or copied in full.
	ReplicaStale ReplicaState = "Stale"
)

// ReplicaStatus is one replica.
type ReplicaStatus struct {
	// Name identifies the replica within the volume; it stays the same
	// for the replica's life, and a replacement gets a new one.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	Name string `json:"name"`

	// Node holds the replica's image.
	// +optional
	// +kubebuilder:validation:MaxLength=253
	Node string `json:"node,omitempty"`

	// State is the replica's health.
	State ReplicaState `json:"state"`

	// OutOfSyncBytes is how much of the volume this replica lacks as the
	// engine of the attachment with epoch engineEpoch sees it: what was
	// written without it and not yet copied to it. Written by that
	// attachment's node while it is Active (unset when the engine misses
	// nothing); the controller ignores it unless engineEpoch is the
	// Active attachment's, and clears it once that attachment is gone.
	// +optional
	// +kubebuilder:validation:Minimum=0
	OutOfSyncBytes int64 `json:"outOfSyncBytes,omitempty"`

	// ResyncPercent is how far the engine's running resync of this
	// replica got; set by the same writer as outOfSyncBytes, only while
	// the engine copies to the replica (unset while it waits for the
	// replica to answer again).
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	ResyncPercent *int32 `json:"resyncPercent,omitempty"`

	// EngineEpoch is the epoch of the attachment whose engine wrote
	// outOfSyncBytes and resyncPercent, set with them.
	// +optional
	// +kubebuilder:validation:Minimum=0
	EngineEpoch int64 `json:"engineEpoch,omitempty"`

	// Endpoint is where the replica is served over NBD+TLS, host:port.
	// +optional
	// +kubebuilder:validation:MaxLength=261
	Endpoint string `json:"endpoint,omitempty"`

	// Message says why the replica is in its state, for humans.
	// +optional
	// +kubebuilder:validation:MaxLength=1024
	Message string `json:"message,omitempty"`

	// LastTransitionTime is when State last changed.
	// +optional
	LastTransitionTime metav1.Time `json:"lastTransitionTime,omitempty"`
}

// AttachmentRole says which of a volume's attachments the controller
// holds to be the writer.
// +kubebuilder:validation:Enum=Active;Standby
type AttachmentRole string

const (
	// AttachmentActive is the volume's writer: the only attachment, or a
	// live migration's source.
	AttachmentActive AttachmentRole = "Active"
	// AttachmentStandby is a live migration's target: staged without
	// taking the replicas over, until its first write activates it (which
	// fences the source) or it is unpublished (a rollback).
	AttachmentStandby AttachmentRole = "Standby"
)

// Attachment is a node that the volume is published to.
type Attachment struct {
	// Node is the node that assembles the volume.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Node string `json:"node"`

	// Epoch is what this node presents to the replica servers, which
	// refuse writes and flushes from any lower epoch, so an older holder
	// of the volume is fenced off.
	// +kubebuilder:validation:Minimum=1
	Epoch int64 `json:"epoch"`

	// Role is Active for the volume's writer and Standby for a live
	// migration's target. Unpublishing the Active one while a Standby
	// exists confirms the migration: the Standby becomes Active.
	// Unpublishing the Standby rolls the migration back. An entry
	// written before roles existed is the only attachment, hence Active.
	// +kubebuilder:default=Active
	// +optional
	Role AttachmentRole `json:"role,omitempty"`

	// Conditions are the attachment as its node sees it. DataPathReady
	// (AttachmentDataPathReady) is False while the node's data path does
	// not serve the volume: the data path process is down, or it could
	// not take the device back after a restart. Written by the node's CSI
	// plugin, which watches the data path.
	// +optional
	// +listType=map
	// +listMapKey=type
	// +kubebuilder:validation:MaxItems=8
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// AttachmentDataPathReady is the Attachment condition saying whether the
// node's data path serves the volume.
const AttachmentDataPathReady = "DataPathReady"

// QuorumVolumeStatus is what the controller and the node agents observe.
//
// Attachments is a list, not one field, for KubeVirt live migration: the
// migration target is attached beside the source, with the next epoch
// reserved for it, until the source is unpublished (fencing: pkg/nbd's doc).
//
// +kubebuilder:validation:XValidation:rule="!has(oldSelf.epoch) || (has(self.epoch) && self.epoch >= oldSelf.epoch)",message="status.epoch never decreases: a reused epoch would let a fenced node write again"
// +kubebuilder:validation:XValidation:rule="!has(self.attachments) || self.attachments.all(a, has(self.epoch) && a.epoch <= self.epoch)",message="an attachment's epoch must not exceed status.epoch"
// +kubebuilder:validation:XValidation:rule="!has(self.attachments) || self.attachments.size() == 0 || self.attachments.exists_one(a, !has(a.role) || a.role == 'Active')",message="exactly one attachment is Active"
// +kubebuilder:validation:XValidation:rule="!has(self.attachments) || self.attachments.all(s, !has(s.role) || s.role != 'Standby' || self.attachments.all(a, (has(a.role) && a.role == 'Standby') || a.epoch < s.epoch))",message="a Standby attachment's epoch must be newer than the Active one's: it fences the source when it activates"
type QuorumVolumeStatus struct {
	// Phase summarises the volume's health.
	// +optional
	Phase VolumePhase `json:"phase,omitempty"`

	// Ready is "healthy/total" replicas, for `kubectl get qv`
	// (ReadySummary computes it). A Resyncing replica is not healthy.
	// +optional
	// +kubebuilder:validation:Pattern=`^[0-9]+/[0-9]+$`
	// +kubebuilder:validation:MaxLength=8
	Ready string `json:"ready,omitempty"`

	// ResyncPercent is the progress of the slowest Resyncing replica
	// (its resyncPercent, 0 while its resync has not started), for
	// `kubectl get qv`; unset while no replica is Resyncing. Written by
	// the controller.
	// +optional
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=100
	ResyncPercent *int32 `json:"resyncPercent,omitempty"`

	// Replicas lists every replica the controller has placed, including
	// one being rebuilt beside the one it replaces.
	// +optional
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=14
	Replicas []ReplicaStatus `json:"replicas,omitempty"`

	// Epoch is the highest epoch ever handed out for this volume. It never
	// decreases, so detaching and attaching again can never reuse one.
	// +optional
	// +kubebuilder:validation:Minimum=0
	Epoch int64 `json:"epoch,omitempty"`

	// Attachments are the nodes the volume is published to, oldest epoch
	// first: one, or two during a live migration.
	// +optional
	// +listType=map
	// +listMapKey=node
	// +kubebuilder:validation:MaxItems=2
	Attachments []Attachment `json:"attachments,omitempty"`

	// Conditions are the standard Kubernetes conditions, e.g. why
	// replicas could not be placed.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`

	// ObservedGeneration is the spec generation the status describes.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
}

// QuorumVolume is one replicated block volume.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=qv,categories=quorum
// +kubebuilder:printcolumn:name="Size",type=string,JSONPath=`.spec.size`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.ready`,description="healthy/total replicas"
// +kubebuilder:printcolumn:name="Resync",type=integer,JSONPath=`.status.resyncPercent`,description="percent done of the slowest replica's resync; empty when none resyncs"
// +kubebuilder:printcolumn:name="Pattern",type=string,JSONPath=`.spec.readPattern`
// +kubebuilder:printcolumn:name="Active",type=string,JSONPath=`.status.attachments[?(@.role=="Active")].node`,description="node of the Active attachment, the writer"
// +kubebuilder:printcolumn:name="Standby",type=string,JSONPath=`.status.attachments[?(@.role=="Standby")].node`,description="node of a live migration's Standby attachment"
// +kubebuilder:printcolumn:name="Phase",type=string,JSONPath=`.status.phase`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type QuorumVolume struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec QuorumVolumeSpec `json:"spec"`
	// +optional
	Status QuorumVolumeStatus `json:"status,omitempty"`
}

// QuorumVolumeList is a list of QuorumVolumes.
//
// +kubebuilder:object:root=true
type QuorumVolumeList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []QuorumVolume `json:"items"`
}

// EffectiveVoteThreshold is spec.voteThreshold, or a majority of the
// replicas when it is unset. The schema's immutability rule computes the
// same default in CEL; a test holds the two and the engine's together.
func (s *QuorumVolumeSpec) EffectiveVoteThreshold() int32 {
	if s.VoteThreshold != nil {
		return *s.VoteThreshold
	}
	return s.Replicas/2 + 1
}

// ReadySummary formats status.ready: replicas that are Healthy out of
// spec.replicas.
func (qv *QuorumVolume) ReadySummary() string {
	healthy := 0
	for _, r := range qv.Status.Replicas {
		if r.State == ReplicaHealthy {
			healthy++
		}
	}
	return fmt.Sprintf("%d/%d", healthy, qv.Spec.Replicas)
}
