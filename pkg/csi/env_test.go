package csi

import (
	"context"
	"flag"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/controller"
)

func TestMain(m *testing.M) {
	flag.Parse()
	// The CSI calls' and the reconciler's logs are only worth reading
	// with -v.
	var w io.Writer = io.Discard
	if testing.Verbose() {
		w = os.Stderr
	}
	log.SetLogger(zap.New(zap.UseDevMode(true), zap.WriteTo(w)))
	os.Exit(m.Run())
}

// env is a real API server with the CRD, the reconciler running
// in-process, and the Identity and Controller services served over a
// unix socket in t.TempDir(), reached through real gRPC clients.
type env struct {
	t     *testing.T
	c     client.Client
	ids   csipb.IdentityClient
	ctl   csipb.ControllerClient
	agent string // field manager of the simulated node agents
	rc    *rest.Config
	sock  string // the Controller and Identity services' socket
}

// envOption adds a runnable to the env's manager, given the Controller
// service the CSI server serves.
type envOption func(mgr ctrl.Manager, ctl *Controller) error

func startEnv(t *testing.T, opts ...envOption) *env {
	srv := kubetest.Start(t)
	scheme := kruntime.NewScheme()
	for _, add := range []func(*kruntime.Scheme) error{clientgoscheme.AddToScheme, apiextensionsv1.AddToScheme, v1alpha1.AddToScheme} {
		if err := add(scheme); err != nil {
			t.Fatal(err)
		}
	}
	c, err := client.New(srv.Config, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	e := &env{t: t, c: c, agent: "quorum-agent", rc: srv.Config}
	e.installCRD()
	if err := c.Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: contract.DefaultNamespace}}); err != nil {
		t.Fatalf("create namespace: %v", err)
	}

	mgr, err := ctrl.NewManager(srv.Config, ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Cache:                  controller.CacheOptions(contract.DefaultNamespace),
		Controller:             config.Controller{SkipNameValidation: ptr.To(true)},
	})
	if err != nil {
		t.Fatalf("manager: %v", err)
	}
	r, err := controller.New(mgr.GetClient(), mgr.GetEventRecorder(controller.FieldManager), controller.Options{Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	// The CSI server runs as the controller binary runs it: a Runnable of
	// the manager, with a client that reads from the API server.
	sock := filepath.Join(t.TempDir(), "csi.sock")
	e.sock = sock
	ctl := NewController(c)
	if err := mgr.Add(&Server{
		Endpoint:   "unix://" + sock,
		Identity:   NewIdentity(APIProber{Client: c}),
		Controller: ctl,
		Log:        log.Log.WithName("csi"),
	}); err != nil {
		t.Fatal(err)
	}
	for _, opt := range opts {
		if err := opt(mgr, ctl); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	// Registered after kubetest.Start's cleanup, so it runs before the API
	// server stops.
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	})

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.ids, e.ctl = csipb.NewIdentityClient(conn), csipb.NewControllerClient(conn)
	// The socket appears once the manager has started the server.
	e.poll("the CSI socket answering", func(ctx context.Context) bool {
		_, err := e.ids.GetPluginInfo(ctx, &csipb.GetPluginInfoRequest{})
		return err == nil
	})
	return e
}

func (e *env) installCRD() { qvtest.InstallCRD(e.t, e.c) }

// poll waits up to 30 s for ok.
func (e *env) poll(what string, ok func(context.Context) bool) {
	e.t.Helper()
	qvtest.Poll(e.t, what, 30*time.Second, ok)
}

// node creates a Node with labels (pairs) and keeps its agent's Lease
// current, so the reconciler places replicas on it.
func (e *env) node(name string, labels ...string) {
	e.t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"kubernetes.io/hostname": name}}}
	for i := 0; i+1 < len(labels); i += 2 {
		n.Labels[labels[i]] = labels[i+1]
	}
	if err := e.c.Create(e.t.Context(), n); err != nil {
		e.t.Fatalf("create node %s: %v", name, err)
	}
	if err := contract.RenewLease(e.t.Context(), e.c, e.c, contract.DefaultNamespace, name, time.Hour); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) get(name string) *v1alpha1.QuorumVolume { return qvtest.Get(e.t, e.c, name) }

// waitFor polls volume name until ok holds, for up to 30 s.
func (e *env) waitFor(name, what string, ok func(*v1alpha1.QuorumVolume) bool) *v1alpha1.QuorumVolume {
	e.t.Helper()
	return qvtest.WaitFor(e.t, e.c, name, what, 30*time.Second, ok)
}

// report sets a replica's state as its node agent does: read-modify-write
// of the status under the agent's field manager, retried on conflict.
func (e *env) report(volume, replica string, state v1alpha1.ReplicaState, msg string) {
	e.t.Helper()
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		qv := &v1alpha1.QuorumVolume{}
		if err := e.c.Get(e.t.Context(), client.ObjectKey{Name: volume}, qv); err != nil {
			return err
		}
		for i := range qv.Status.Replicas {
			r := &qv.Status.Replicas[i]
			if r.Name == replica {
				r.State, r.Message, r.Endpoint = state, msg, r.Node+":10809"
				r.LastTransitionTime = metav1.Now()
			}
		}
		return e.c.Status().Update(e.t.Context(), qv, client.FieldOwner(e.agent))
	})
	if err != nil {
		e.t.Fatalf("report %s/%s %s: %v", volume, replica, state, err)
	}
}
