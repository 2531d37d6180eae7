package contract

import (
	"net/url"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// ChildReplica names the replica of qv that an engine child on node (the
// attached node) stands for, "" when none does. A child is named by the
// URI the CSI node stages the replica with: nbds+unix:///<volume>?socket=…
// for node's own replica, through its agent's local socket, and
// nbds://<endpoint>/<volume>?… for a replica at its endpoint.
func ChildReplica(qv *v1alpha1.QuorumVolume, node, child string) string {
	u, err := url.Parse(child)
	if err != nil {
		return ""
	}
	for _, r := range qv.Status.Replicas {
		if r.State == v1alpha1.ReplicaStale {
			continue
		}
		switch u.Scheme {
		case "nbds+unix":
			if r.Node == node {
				return r.Name
			}
		case "nbds":
			if r.Endpoint != "" && r.Endpoint == u.Host {
				return r.Name
			}
		}
	}
	return ""
}
