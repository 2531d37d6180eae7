// Package controller holds the controller binary's reconcilers: the
// QuorumVolume control loop (Reconciler) and the PVC resizer (Resizer,
// resizer.go, which does external-resizer's part of a PVC expansion
// through a VolumeExpander, the CSI Controller in process, and writes the
// PV capacity and the claim status the kubelet reads to finish the
// expansion on the node).
//
// The QuorumVolume control loop places replicas on nodes, follows their
// nodes' health, derives each volume's phase and conditions, and holds
// deleted volumes until their replica images are gone; attachments and
// epochs are contract.Attach and contract.Detach's. It does no I/O on
// replicas; the node agents (cmd/datapath) do. What they and the CSI
// services agree on with the controller is package contract; this doc
// says what the controller does with it.
//
// # Node liveness
//
// A node is alive while its agent's Lease is current; the Lease, its
// name and timing, and who writes which status field are package
// contract's (see its doc). A Lease running out is no watch event: the
// controller keeps a timer per agent Lease, set for its expiry by each
// renewal, and when one runs out it reconciles the volumes of that node.
// An idle volume is not reconciled again until something about it or
// its nodes changes.
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
// While a live migration holds two attachments no replacement is placed:
// Placed is False with reason MigrationInProgress until one is
// unpublished, because the standby was staged with the replica set of
// its publish and must activate on the same set the source writes.
//
// A placed replica is a status.replicas entry {name, node, state
// Creating, lastTransitionTime}, written by field manager
// "quorum-controller" (contract.ControllerFieldManager). Names are "r<N>", N one past the highest ever
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
// it rather than force Healthy over it, and so is an entry the
// controller shows Resyncing (below). The agent deletes images of
// replicas on its node that no longer appear in the status.
//
// # What the attached engine says
//
// Whether a replica holds every acknowledged write is known to the
// engine of the Active attachment, not to the agent. That attachment's
// node writes, per replica its engine misses bytes of, outOfSyncBytes,
// resyncPercent (while it copies) and engineEpoch (its attachment's
// epoch), and removes them once the engine misses nothing or the volume
// is unstaged (package contract's doc). The controller presents them
// (presentResync): a replica the agent reports Healthy whose
// outOfSyncBytes > 0 come from the Active attachment's epoch is shown
// Resyncing (Normal Event ReplicaResyncing), so it is not counted
// healthy and the volume is not Ready; once that engine reports none it
// is Healthy again (Event ReplicaInSync). The state is the controller's
// word alone: the agent reports Resyncing where the entry says so, the
// engine's node never writes state. Values from a Standby's epoch are
// ignored (its engine does not resync); values from an epoch no
// attachment holds any more (a node that crashed or was unpublished
// before it cleared them) are cleared by the controller, so they never
// keep a volume from Ready; the next Active engine writes its own.
// status.resyncPercent is the slowest Resyncing replica's progress (0
// while its resync has not started), the RESYNC column of kubectl get
// qv.
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
// Phase: Ready when spec.replicas replicas are Healthy (so none is
// Resyncing); Pending while the
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
// contract.Attach and contract.Detach, called by the CSI ControllerPublish
// and ControllerUnpublish, write status.epoch and status.attachments; the
// reconciler keeps them as they are.
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
