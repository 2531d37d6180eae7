package contract

// DriverName is the CSI driver name, as in the CSIDriver object, the
// StorageClasses' provisioner and the PVs' spec.csi.driver.
const DriverName = "quorum.csi.dev"

// Field managers: who writes what in a QuorumVolume (the package doc
// lists the fields of each).
const (
	// ControllerFieldManager is the field manager of everything the
	// reconciler writes and of Attach and Detach, and the
	// reportingController of their Events.
	ControllerFieldManager = "quorum-controller"
	// CSIFieldManager owns the QuorumVolume specs the CSI Controller
	// service writes (CreateVolume, ControllerExpandVolume).
	CSIFieldManager = "quorum-csi-controller"
	// NodeReportingController names the node's data path and CSI plugin
	// in the Events they write; the instance is NodeReportingController-<node>.
	NodeReportingController = "quorum-node"
)

// AgentFieldManager is the field manager of node's status reports: the
// agent's replica entries and the node's attachment conditions.
func AgentFieldManager(node string) string { return "quorum-agent-" + node }

// ConditionReady is the QuorumVolume condition that is True when every
// replica is Healthy; otherwise its reason is the phase. The reconciler
// sets it; the CSI controller reads it for volume health.
const ConditionReady = "Ready"

// EngineFieldManager is the field manager of the engine's view that
// node writes while it holds a volume's Active attachment:
// status.replicas[].outOfSyncBytes, resyncPercent and engineEpoch. It is
// not AgentFieldManager(node): the agent applies only its own node's
// entries, and an apply drops what its manager owned and left out.
func EngineFieldManager(node string) string { return "quorum-engine-" + node }
