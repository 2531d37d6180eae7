// Package agent is the node replica agent (cmd/datapath): it creates the
// replica images the controller places on its node, serves them over NBD
// (mutual TLS, epoch-fenced), grows and deletes them, and reports them in
// the QuorumVolume status. This comment is the agent's side of the
// contract with the controller (package contract, and its doc).
//
// # Liveness
//
// The agent on node N holds the coordination.k8s.io/v1 Lease
// "quorum-agent-N" (LeaseName) in the driver namespace (--namespace,
// DefaultNamespace "quorum-csi"), holderIdentity N, leaseDurationSeconds
// 30, renewed every 10 s (DefaultLeaseDuration, DefaultRenewInterval;
// configurable for tests). It creates the Lease if missing and takes it
// over (acquireTime, leaseTransitions) if another holder is named or it
// expired, as contract.RenewLease does. On
// shutdown it stops renewing, so the Lease expires 30 s after the last
// renewal. The controller places replicas only on nodes with a current
// Lease and marks the replicas of a node whose Lease expired Faulty.
//
// # Placement and creation
//
// The controller adds entries {name, node, state: Creating} to
// status.replicas. The agent acts on the entries whose node is N:
//
//   - the image is DATA/<volume>/<replica>.img (--data-dir) with its
//     .qmeta, .qjournal and .qepoch beside, spec.size bytes, volume id
//     the QuorumVolume's UID, replica id the entry's name
//     (replica.CreateWithID);
//   - an existing image with those ids is reused (agent restart); one
//     with other ids, or without readable metadata, is never touched:
//     the entry becomes Faulty with a message saying what is in the way;
//   - it is served on the node's one NBD server (--listen, default
//     :10809; --tls-dir for mutual TLS) as two exports named after the
//     QuorumVolume, NAME and NAME/meta (volume.ReplicaExports), so a node
//     serves at most one replica per volume;
//   - the agent reports, by server-side apply of the status subresource
//     with field manager "quorum-agent-N" (FieldManager) and only its own
//     entries: state Healthy, endpoint host:port (--advertise-address and
//     the listener's port), message, lastTransitionTime (kept while the
//     state stays). The entries are a listType=map keyed by name, so the
//     controller's fields and other agents' entries are untouched.
//     Ownership of state is forced: the controller wrote Creating into it.
//   - a failure (disk full, a size that is not a multiple of 4096, an
//     image in the way) makes the entry Faulty with the error as message,
//     and the reconcile is retried with exponential backoff.
//
// An entry the controller marked Stale (its Node is gone) is not
// reported any more: the agent's fields (the endpoint) leave it, its
// state stays the controller's, and the image is kept until the entry
// leaves the status.
//
// At start, before it reaches the API server, the agent serves every
// volume folder's one image under its metadata's ids, so that the
// clients of an agent that restarts (a rolling upgrade of cmd/datapath)
// reconnect within moments instead of after its first reconcile; the
// reconciler then finds them served. One of them that no QuorumVolume
// places on N is an orphan (below) and stops being served.
//
// Healthy means the image exists and is served. Whether it holds every
// write is known to the Active attachment's engine, not to the agent:
// while that engine reports bytes the replica misses, the controller
// shows the entry Resyncing, and the agent reports Resyncing rather than
// force Healthy over it (its endpoint and message stay its own); the
// controller turns it Healthy once the engine reports none missing.
// The engine's view (outOfSyncBytes, resyncPercent, engineEpoch) is
// written by the attached node's CSI plugin (DataPathWatcher), under a
// field manager of its own (contract.EngineFieldManager).
//
// # Growth
//
// When spec.size grows, the agent stops serving the replica (its
// connections end and clients reconnect), grows the image and its
// metadata, moving the journal's records for the new slot size
// (volume.GrowReplica), serves it again and reports the new size.
//
// # Deletion
//
//   - When the QuorumVolume has a deletionTimestamp (the controller's
//     finalizer "quorum.csi.dev/replicas" keeps it), the agent stops
//     serving the node's replica of it, deletes image, .qmeta, .qjournal
//     and .qepoch of every replica placed on N and of every image in the
//     volume's folder whose metadata carries the volume's UID, then
//     removes its entries: whole entries, by a JSON patch guarded by the
//     volume's uid and each entry's name (an apply without them would
//     drop only the agent's fields and leave the controller's name and
//     node behind, an entry without its required state), then an apply
//     with its field manager and no entries drops anything else it still
//     owns. The controller removes the finalizer once no entry is left.
//   - When an entry of node N leaves the status, or loses its node, while
//     the volume lives (the controller removed a replaced replica), the
//     agent deletes that image too, and stops reporting it.
//   - Nothing else is deleted: an image the agent cannot attribute to an
//     entry it saw removed, or to a volume being deleted, is an orphan.
//     The agent logs orphans at start and leaves them on disk. This includes an
//     entry removed while the agent was not running, and a volume that
//     disappeared without a deletionTimestamp seen by the agent.
//
// # Fencing
//
// The agent does not read status.attachments. Each replica's exports are
// fenced by its epoch file (.qepoch): the attaching node presents
// status.attachments[].epoch when it connects, and the server refuses
// every older epoch once a newer one wrote (package nbd).
//
// # Metrics and logs
//
// Prometheus metrics on --metrics-address (default :9809, "0" off) at
// /metrics: quorum_agent_replicas_served, and per volume
// quorum_agent_replica_bytes_total{op=read|write},
// quorum_agent_replica_requests_total{op},
// quorum_agent_replica_io_errors_total{op} and
// quorum_agent_replica_failures_total{action=serve|delete}; beside them
// controller-runtime's (reconcile errors, work queue, API client).
// Logs are structured (logr; cmd/datapath writes JSON lines).
//
// # Shutdown
//
// When Run's context ends (the data path lets go in cmd/datapath: on
// SIGTERM, or handing over to a successor) the agent stops renewing the
// Lease, stops reconciling, stops the NBD server taking requests,
// lets those in flight finish (up to ShutdownTimeout), and closes the
// replicas.
package agent
