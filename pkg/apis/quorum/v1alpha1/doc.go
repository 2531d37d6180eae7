// Package v1alpha1 is the quorum.csi.dev/v1alpha1 API: the QuorumVolume,
// one replicated block volume, which the CSI controller creates for a PVC
// or a user creates directly with kubectl. config/crd/ is generated from
// the markers here by `make generate`; the schema's validation (OpenAPI and
// CEL rules) is enforced by the API server itself, so every client, not
// only ours, is held to it.
//
// +kubebuilder:object:generate=true
// +groupName=quorum.csi.dev
package v1alpha1
