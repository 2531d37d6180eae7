// Package controller is the QuorumVolume control loop: it places replicas
// on nodes, follows their nodes' health, derives each volume's phase and
// conditions, hands out attachments and epochs (Attach, Detach), and holds
// deleted volumes until their replica images are gone. It does no I/O on
// replicas; the node agents (cmd/datapath) do, and this file is the contract
// between them and the controller.
//
// # Node liveness
//
// Every node agent holds a coordination.k8s.io/v1 Lease named
// LeaseName(node) ("quorum-agent-<node>") in the driver namespace
// (DefaultNamespace, "quorum-csi", unless configured), with
// holderIdentity the node name and leaseDurationSeconds 30
// (DefaultLeaseDuration), renewed every 10 s (DefaultRenewInterval) the
// way RenewLease does it: created if missing, taken over (acquireTime,
// leaseTransitions) when it expired or names another holder, updated
// with its resourceVersion. The agent calls RenewLease with a reader
// that goes to the API server rather than through a cache. A node runs its agent while its Lease is
// current: renewTime + leaseDurationSeconds is in the future and the
// holder is the node.
//
// # Placement
//
// For a volume with fewer than spec.replicas replicas that are not Stale,
// the controller chooses the missing number of nodes at once, among nodes
// that exist, are not cordoned or being deleted, match
// spec.placement.nodeSelector, carry the spreadKey label (a node without
// it is not eligible: its failure domain is unknown), have a current
// agent Lease, hold no replica of the volume and have a spreadKey value
// that none of its replicas has. spec.placement.preferredNode gets one
// replica when eligible; the others go to the nodes with the fewest
// replicas of all volumes, ties broken by name. With too few eligible
// nodes nothing is placed: condition Placed is False with reason
// InsufficientNodes and a message giving the numbers and why each other
// node was excluded, and the volume is retried when Nodes or Leases
// change. Each placement decision is a Normal Event, reason Placed.
//
// A placed replica is a status.replicas entry {name, node, state
// Creating, lastTransitionTime}, written by field manager
// "quorum-controller". Names are "r<N>", N one past the highest ever
// listed for the volume, so a replacement never reuses a name.
//
// # What the agent writes
//
// The agent owns the entries of replicas on its node from Creating on: it
// creates the image and sets state (Healthy, Faulty), endpoint, message
// and lastTransitionTime by server-side apply of only its own entries,
// with its own field manager and forced ownership (this controller wrote
// Creating or Faulty into state); the entries are a map keyed by name,
// so its apply leaves the controller's fields and other agents' entries
// alone. The controller writes by read-modify-write with the object's
// resourceVersion (Status().Update) and retries on conflict. An entry
// the controller marked Stale is left to it: the agent stops reporting
// it rather than force Healthy over it. Resyncing, resyncPercent and
// outOfSyncBytes are known to the attached node's engine, not to the
// agent, which never sets them; Ready therefore means every replica is
// served, not that an attached engine finished resyncing them. The
// agent deletes images of replicas on its node that no longer appear in
// the status.
//
// # What the controller does to replicas
//
//   - The agent's Lease expires: its replicas become Faulty with the
//     message "node agent on <node> not renewing its lease". The
//     controller never sets a replica Healthy; when the agent runs again
//     it reports the state itself.
//   - The Node object is deleted: its replicas become Stale and a
//     replacement (a new name) is placed on another eligible node, by the
//     rules above. The Stale entry stays until spec.replicas replicas are
//     Healthy, then the controller removes it.
//
// # Phase and conditions
//
// Phase: Ready when spec.replicas replicas are Healthy; Pending while the
// volume is being set up and nothing went wrong (replicas missing or
// Creating, none Faulty, Resyncing or Stale); otherwise Degraded when at
// least the effective voteThreshold replicas are Healthy and Faulted when
// fewer are; Deleting once deleted. A change to Degraded or Faulted is a
// Warning Event. status.ready is ReadySummary(), status.observedGeneration
// the generation reconciled; conditions Placed and Ready (whose reason is
// the phase when False).
//
// # Attachments and epochs
//
// Attach and Detach are called by the CSI ControllerPublish and
// ControllerUnpublish. Each attachment gets status.epoch+1, which becomes
// status.epoch; status.epoch never decreases, so an epoch is never
// handed out twice. A single-node volume has at most one attachment
// (ErrAttachedElsewhere), a multi-node one at most two (live migration,
// ErrTooManyAttachments).
//
// # Deletion
//
// The controller adds the finalizer "quorum.csi.dev/replicas" to every
// volume. Once the volume is deleted its phase is Deleting; each agent
// deletes its replica images and then removes its entries from
// status.replicas. The controller removes the finalizer when
// status.replicas is empty, or when every remaining entry is on a node
// whose Node object is gone, since nothing is left to delete those
// images. Attachments do not hold a deletion back.
package controller
