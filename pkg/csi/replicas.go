package csi

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"slices"

	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// waitReplicas returns the volume once at least its voteThreshold
// replicas are Healthy with an endpoint: fewer could not take a write.
// A volume that is not ready when ctx ends fails the call retryably.
func (s *Node) waitReplicas(ctx context.Context, id string) (*v1alpha1.QuorumVolume, error) {
	var qv *v1alpha1.QuorumVolume
	healthy := 0
	err := wait.PollUntilContextCancel(ctx, pollInterval, true, func(ctx context.Context) (bool, error) {
		qv = &v1alpha1.QuorumVolume{}
		if err := s.cfg.Client.Get(ctx, client.ObjectKey{Name: id}, qv); err != nil {
			return false, fmt.Errorf("get QuorumVolume %s: %w", id, err)
		}
		healthy = 0
		for _, r := range qv.Status.Replicas {
			if r.State == v1alpha1.ReplicaHealthy && r.Endpoint != "" {
				healthy++
			}
		}
		return healthy >= int(qv.Spec.EffectiveVoteThreshold()), nil
	})
	if err != nil {
		if qv != nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)) {
			return nil, fmt.Errorf("volume %s: %d of the %d Healthy replicas a write needs: %w", id, healthy, qv.Spec.EffectiveVoteThreshold(), err)
		}
		return nil, err
	}
	return qv, nil
}

// replicaURIs lists the replicas to assemble in fifo order: this node's
// first, through the agent's local socket, then the others over NBD+TLS.
// Replicas being replaced (Stale) or not served yet are left out; faulty
// ones are included, so that the engine resyncs them when they answer.
func (s *Node) replicaURIs(qv *v1alpha1.QuorumVolume) []string {
	reps := slices.Clone(qv.Status.Replicas)
	slices.SortStableFunc(reps, func(a, b v1alpha1.ReplicaStatus) int {
		switch {
		case a.Node == s.cfg.NodeName && b.Node != s.cfg.NodeName:
			return -1
		case b.Node == s.cfg.NodeName && a.Node != s.cfg.NodeName:
			return 1
		}
		return 0
	})
	certs := url.QueryEscape(s.cfg.TLSDir)
	var uris []string
	for _, r := range reps {
		if r.Endpoint == "" || r.State == v1alpha1.ReplicaStale {
			continue
		}
		if r.Node == s.cfg.NodeName {
			uris = append(uris, fmt.Sprintf("nbds+unix:///%s?socket=%s&tls-certificates=%s&tls-hostname=%s",
				qv.Name, url.QueryEscape(s.cfg.LocalSocket), certs, url.QueryEscape(s.cfg.TLSHostname)))
			continue
		}
		uris = append(uris, fmt.Sprintf("nbds://%s/%s?tls-certificates=%s", r.Endpoint, qv.Name, certs))
	}
	return uris
}
