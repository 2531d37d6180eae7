// Package qvtest holds what the tests that run against a real API server
// (internal/kubetest) do with QuorumVolumes: start a server with the CRD
// and the driver namespace (Start), install the CRD from config/crd,
// read a volume, wait for one to reach a state.
package qvtest

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// Scheme knows client-go's kinds, CRDs and QuorumVolumes.
func Scheme(t testing.TB) *kruntime.Scheme {
	t.Helper()
	scheme := kruntime.NewScheme()
	for _, add := range []func(*kruntime.Scheme) error{clientgoscheme.AddToScheme, apiextensionsv1.AddToScheme, v1alpha1.AddToScheme} {
		if err := add(scheme); err != nil {
			t.Fatal(err)
		}
	}
	return scheme
}

// Start starts a real API server (kubetest.Start), installs the CRD,
// creates the driver namespace (contract.DefaultNamespace) and returns
// the server and a client with Scheme that reads straight from it.
func Start(t testing.TB) (*kubetest.Server, client.Client) {
	t.Helper()
	srv := kubetest.Start(t)
	c, err := client.New(srv.Config, client.Options{Scheme: Scheme(t)})
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	InstallCRD(t, c)
	if err := c.Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: contract.DefaultNamespace}}); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	return srv, c
}

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
		t.Fatalf("create CRD (a schema the API server refuses, e.g. a CEL rule over its cost limit, fails here): %v", err)
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
