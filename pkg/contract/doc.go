// Package contract is what the controller, the node agent and the CSI
// services agree on, and nothing else: the agents' Lease (name, timing,
// renewal), attaching and detaching a volume with its epoch and errors,
// the conflict backoff of QuorumVolume writes, the field managers, and
// one way to write Events (an events.EventRecorder). It imports only
// pkg/apis and the Kubernetes client libraries, so the node binaries
// (cmd/node, cmd/datapath) link it without the reconcilers
// (pkg/controller), and each side's package doc can point here.
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
// that goes to the API server rather than through a cache. A node runs
// its agent while its Lease is current (LeaseCurrent): renewTime +
// leaseDurationSeconds is in the future and the holder is the node.
//
// # Who writes what
//
// Every status field has one writer; the others read it. Writers that
// read-modify-write (Update) do so with the object's resourceVersion and
// retry conflicts (ConflictBackoff, or client-go's default backoff), so
// none overwrites another's field with a stale copy.
//
//	field                                  writer (field manager)                       how
//	spec                                   CSI Controller (CSIFieldManager), or kubectl  Create, Update (expansion)
//	metadata.finalizers                    reconciler (ControllerFieldManager)           Patch
//	status.phase, ready, conditions,       reconciler (ControllerFieldManager)           Status().Update
//	  observedGeneration
//	status.replicas[]: name, node;         reconciler (ControllerFieldManager)           Status().Update
//	  state Creating, Faulty (lease lost),
//	  Stale (node gone), Resyncing and
//	  back to Healthy (from the engine's
//	  view); removal of replaced entries;
//	  clearing an engine view whose
//	  attachment is gone
//	status.resyncPercent                   reconciler (ControllerFieldManager)           Status().Update
//	status.replicas[] of node N: state     agent on N (AgentFieldManager(N))             server-side apply, forced,
//	  Healthy/Faulty, endpoint, message,                                                  only its own entries
//	  lastTransitionTime; removal at
//	  deletion
//	status.replicas[]: outOfSyncBytes,     CSI node plugin on N while N holds the        server-side apply, forced,
//	  resyncPercent, engineEpoch           Active attachment (agent.DataPathWatcher,     only those fields
//	                                       EngineFieldManager(N))
//	status.epoch, status.attachments[]:    Attach, Detach (ControllerFieldManager),      Status().Update
//	  the entries, node, epoch, role         called by CSI ControllerPublish/Unpublish
//	status.attachments[] of node N:        CSI node plugin on N, agent.DataPathWatcher  Status().Update
//	  conditions (DataPathReady)             (AgentFieldManager(N))
//
// The attachment entries are a list that two writers share (the
// replica entries, below, are another): Attach and Detach add and
// remove whole entries (node, epoch, role), and Detach turns a
// Standby entry Active, but they never touch an entry's conditions;
// the node's watcher changes only the conditions of its own node's
// entry and never adds or removes one. The reconciler writes the
// whole status back with what it read, so it keeps both.
//
// # The engine's view: Resyncing
//
// Whether a replica holds every acknowledged write is known only to the
// engine of the volume's Active attachment (a Standby's engine does not
// resync). That node's CSI plugin (agent.DataPathWatcher) writes, for
// each replica the engine misses bytes of, outOfSyncBytes, resyncPercent
// (while a resync copies) and engineEpoch (its attachment's epoch), by
// server-side apply under EngineFieldManager(N) with only those fields;
// an entry it leaves out loses them, so they go when the engine misses
// nothing or the volume is unstaged. It writes when a replica starts or
// stops missing writes, progress at most every few seconds
// (agent.DefaultProgressInterval), nothing while nothing changes.
//
// The state Resyncing has one writer, the reconciler: it shows a
// replica Resyncing while the agent says Healthy and outOfSyncBytes > 0
// carry the Active attachment's epoch, and Healthy again once they are
// gone. The agent, which only knows that it serves the image, reports
// Resyncing where the entry says so instead of forcing Healthy over it;
// it still forces Faulty. The node never writes state. So no two writers
// set the same value back and forth, and Ready (every replica Healthy)
// means every replica holds every acknowledged write, as far as an
// attached engine knows. Values whose engineEpoch is no attachment's
// any more (a node that crashed, or was unpublished before it cleared
// them) are cleared by the reconciler and never hold a volume back; a
// Standby's are ignored until it becomes Active; the next Active
// attachment's engine writes its own. A volume attached nowhere has no
// engine view: Healthy then means served, as the agent says.
//
// # Attachments and epochs
//
// Attach and Detach are called by the CSI ControllerPublish and
// ControllerUnpublish. Each attachment gets status.epoch+1, which becomes
// status.epoch; status.epoch never decreases, so an epoch is never
// handed out twice. A single-node volume has at most one attachment
// (ErrAttachedElsewhere), a multi-node one at most MaxAttachments (live
// migration, ErrTooManyAttachments). Both errors are
// FAILED_PRECONDITION in CSI.
//
// The first attachment is Active; a second one is Standby, a live
// migration's target, whose newer epoch fences the source once the
// target's first write activates it. Detaching the Active one while a
// Standby exists confirms the migration (the Standby becomes Active,
// Event MigrationConfirmed); detaching the Standby rolls it back (Event
// MigrationRolledBack). The reconciler starts no rebuild while two
// attachments exist.
//
// # Events
//
// Everything that writes Events does it through an events.EventRecorder:
// the reconcilers through their manager's, the CSI controller and the
// node (engine events, lost volumes) through EventRecorder, which
// writes each Event with a client, as reportingController
// ControllerFieldManager or NodeReportingController.
package contract
