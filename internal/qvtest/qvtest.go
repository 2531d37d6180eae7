// Package qvtest holds what the tests that run against a real API server
// (internal/kubetest) do with QuorumVolumes: install the CRD from
// config/crd, read a volume, wait for one to reach a state.
package qvtest

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// InstallCRD creates the generated QuorumVolume CRD and waits until the
// API server serves QuorumVolumes. c's scheme must know apiextensions/v1.
func InstallCRD(t testing.TB, c client.Client) {
	t.Helper()
	_, self, _, _ := runtime.Caller(0)
	path := filepath.Join(filepath.Dir(self), "..", "..", "config", "crd", "quorum.csi.dev_quorumvolumes.yaml")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read CRD: %v", err)
	}
	crd := &apiextensionsv1.CustomResourceDefinition{}
	if err := yaml.UnmarshalStrict(b, crd); err != nil {
		t.Fatalf("decode %s: %v", path, err)
	}
	if err := c.Create(t.Context(), crd); err != nil {
		t.Fatalf("create CRD: %v", err)
	}
	Poll(t, "QuorumVolumes served", 30*time.Second, func(ctx context.Context) bool {
		return c.List(ctx, &v1alpha1.QuorumVolumeList{}) == nil
	})
}

// Get reads volume name.
func Get(t testing.TB, c client.Client, name string) *v1alpha1.QuorumVolume {
	t.Helper()
	qv := &v1alpha1.QuorumVolume{}
	if err := c.Get(t.Context(), client.ObjectKey{Name: name}, qv); err != nil {
		t.Fatalf("get %s: %v", name, err)
	}
	return qv
}

// WaitFor polls volume name until ok holds, and fails with its last
// state after timeout.
func WaitFor(t testing.TB, c client.Client, name, what string, timeout time.Duration, ok func(*v1alpha1.QuorumVolume) bool) *v1alpha1.QuorumVolume {
	t.Helper()
	var last *v1alpha1.QuorumVolume
	err := wait.PollUntilContextTimeout(t.Context(), 50*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		qv := &v1alpha1.QuorumVolume{}
		if err := c.Get(ctx, client.ObjectKey{Name: name}, qv); err != nil {
			return false, client.IgnoreNotFound(err)
		}
		last = qv
		return ok(qv), nil
	})
	if err != nil {
		b, _ := yaml.Marshal(last)
		t.Fatalf("%s: waiting for %s: %v; last seen:\n%s", name, what, err, b)
	}
	return last
}

// Ready is a volume in phase Ready whose spec.replicas replicas are all
// Healthy with an endpoint.
func Ready(qv *v1alpha1.QuorumVolume) bool {
	if qv.Status.Phase != v1alpha1.VolumeReady || len(qv.Status.Replicas) != int(qv.Spec.Replicas) {
		return false
	}
	for _, r := range qv.Status.Replicas {
		if r.State != v1alpha1.ReplicaHealthy || r.Endpoint == "" {
			return false
		}
	}
	return true
}

// Poll waits up to timeout for ok.
func Poll(t testing.TB, what string, timeout time.Duration, ok func(context.Context) bool) {
	t.Helper()
	err := wait.PollUntilContextTimeout(t.Context(), 50*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		return ok(ctx), nil
	})
	if err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}
