// Package csi holds the CSI services of the quorum.csi.dev driver:
// Identity (identity.go), Controller (controller.go), and the Node
// service beside them (node.go, served by the node binary), all served
// by Server (server.go) on one gRPC endpoint per binary. The Node
// service holds no volume: it orders a volume's replicas (replicas.go),
// has the node's data path (package datapath, its own process) serve
// them as a block device, and makes and mounts the filesystem on it
// (fstools.go).
//
// The Controller service holds no state: a volume is a QuorumVolume
// named by its CSI volume ID. CreateVolume writes its spec from the
// StorageClass parameters (params.go) and returns at once; the
// reconciler (package controller) places the replicas and the node
// agents create them. ControllerPublishVolume and
// ControllerUnpublishVolume are contract.Attach and contract.Detach,
// which hand out the epoch the node presents to the replica servers.
// ControllerExpandVolume grows spec.size, offline only: a published
// volume is FAILED_PRECONDITION.
//
// The PVC resizer, run by the controller binary with --resizer, is a
// reconciler (controller.Resizer); it expands through the Controller's
// ExpandVolume, in process, which is ControllerExpandVolume with the
// gRPC code of its error.
//
// Contract with the Node service:
//   - node IDs are Kubernetes Node names (ControllerPublishVolume checks
//     that the Node exists), and NodeGetInfo reports the topology
//     segment TopologyKeyNode with the node's name;
//   - publish_context[PublishContextEpoch] is the attachment's epoch;
//   - publish_context[PublishContextStandby] is "true" for a live
//     migration's target (a Standby attachment): NodeStage stages it as
//     a data path standby, which takes the replicas over only at its
//     first write;
//   - volume_context[VolumeContextFSType], when set, is the filesystem
//     to make on a Filesystem volume (ext4 or xfs);
//   - a volume may still be Pending when it is published: NodeStage
//     waits for (or fails retryably until) its replicas are Healthy;
//   - ControllerExpandVolume always asks for node expansion, in both
//     modes. Expansion is offline: the node assembles the volume at its
//     new size at the next NodeStageVolume, which also grows an ext
//     filesystem (offline); NodeExpandVolume then grows an XFS
//     filesystem, and in either mode answers FAILED_PRECONDITION while
//     the staged device is still smaller than required_bytes.
//
// Every call validates its request first (INVALID_ARGUMENT naming the
// field or parameter) and is idempotent. The calls that change a volume
// (CreateVolume, DeleteVolume, Controller(Un)PublishVolume,
// ControllerExpandVolume, Node(Un)StageVolume, Node(Un)PublishVolume,
// NodeExpandVolume) admit one call per volume at a time (ABORTED for a
// second one); the calls that only read (ValidateVolumeCapabilities,
// ControllerGetVolume, the health calls, NodeGetVolumeStats) take no
// lock. Handlers return wrapped errors;
// toStatus (errors.go), applied by the server's interceptor, is the one
// place where they become gRPC codes.
package csi
