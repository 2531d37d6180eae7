// Package pkg holds no code: it is the map of the packages below it. The
// import graph flows one way, each layer importing only layers below it:
//
//	cmd/controller, cmd/node, cmd/datapath, cmd/quorumctl
//	pkg/controller, pkg/csi, pkg/agent, pkg/cli
//	pkg/contract (-> pkg/apis only), pkg/datapath
//	pkg/volume
//	pkg/attach, pkg/metrics
//	pkg/replica, pkg/quorum, pkg/nbd
//
// pkg/contract imports only pkg/apis and the Kubernetes client
// libraries, so the node binaries (cmd/node, cmd/datapath) link it and
// never the reconcilers of pkg/controller (`go list -deps ./cmd/node`).
//
// Where to find:
//
//   - where the epoch fence is checked: pkg/nbd/epoch.go (the server's
//     fence beside the epoch store: beginWrite admits a write or flush
//     under the export's current epoch, activate makes a newer one
//     current, persists it and ends older connections); the epoch a
//     connection presents is resolved at open in pkg/nbd/negotiate.go
//     (resolve, attach) and each request is checked in
//     pkg/nbd/transmit.go (check).
//   - where fifo puts the local replica first: pkg/csi/replicas.go
//     (Node.replicaURIs orders the QuorumVolume's replicas, this node's
//     first, through the agent's local socket); the engine reads its
//     children in that order (pkg/quorum/engine.go, Engine.ReadAt and
//     readFIFO).
//   - where a staged volume's device is made: pkg/csi/node.go
//     (NodeStageVolume) asks the node's data path, pkg/datapath/service.go
//     (Service.Stage), which calls volume.Attach in
//     pkg/volume/attached.go; its device comes from attach.Attach in
//     pkg/attach/attach.go (ublk or FUSE+loop).
//   - where replicas are placed: pkg/controller/placement.go (Place, a
//     pure function), called by the reconciler in
//     pkg/controller/reconciler.go (Reconciler.place).
//   - where REPORT_BAD becomes a Kubernetes Event: pkg/agent/events.go
//     (VolumeEvents.Engine, at most one per kind and replica every
//     EventInterval, written through contract.EventRecorder), which
//     cmd/datapath/main.go wires to the data path's engine events
//     (datapath.Config.OnEvent).
//
// Who writes which field of a QuorumVolume: pkg/contract's doc.
package pkg
