// Package scale is the controller's scale benchmark, run by
// bench/scale.sh (see bench/README.md); it is not a test. Its one test,
// TestScale, is skipped unless the script gives it a controller binary
// (-controller).
//
// It starts a real etcd and kube-apiserver (internal/kubetest), the
// controller binary, and in its own process the simulated node agents of
// -nodes Nodes: each renews its agent Lease as the agent does
// (contract.RenewLease, every contract.DefaultRenewInterval) and reports
// the replicas placed on its node Healthy through the agent's own report
// (agent.ReportReplicas: server-side apply under the node's field
// manager), on every change of a QuorumVolume with entries on the node,
// as the agent's reconciler does. They create no images and serve
// nothing: what is measured is the controller and the API traffic.
//
// The run creates -volumes QuorumVolumes at once and measures the time
// until all are Ready, the reconcile latency (the controller's
// controller_runtime_reconcile_time_seconds), the API requests per
// volume (the API server's apiserver_request_total before and after),
// and the controller's RSS and CPU (/proc); then -lost nodes stop
// renewing their Lease and reporting at once, and it measures the time
// until every volume with a replica on one of them is Degraded (Faulted
// when two of its replicas are there); then it idles for -idle and
// measures the API requests per volume and minute. The report goes to
// -out and ends with the one summary line of bench/scale.sh.
package scale
