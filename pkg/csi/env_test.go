package csi

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/controller"
)

func TestMain(m *testing.M) { kubetest.Main(m) }

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
	srv, c := qvtest.Start(t)
	e := &env{t: t, c: c, agent: "quorum-agent", rc: srv.Config}
	// The CSI server runs as the controller binary runs it: a Runnable of
	// the manager, with a client that reads from the API server.
	sock := filepath.Join(t.TempDir(), "csi.sock")
	e.sock = sock
	srv.RunManager(t, ctrl.Options{Scheme: c.Scheme(), Cache: controller.CacheOptions(contract.DefaultNamespace)}, func(mgr ctrl.Manager) error {
		r, err := controller.New(mgr.GetClient(), mgr.GetEventRecorder(controller.FieldManager), controller.Options{Registerer: prometheus.NewRegistry()})
		if err != nil {
			return err
		}
		if err := r.SetupWithManager(mgr); err != nil {
			return err
		}
		ctl := NewController(c)
		if err := mgr.Add(&Server{
			Endpoint:   "unix://" + sock,
			Identity:   NewIdentity(APIProber{Client: c}),
			Controller: ctl,
			Log:        log.Log.WithName("csi"),
		}); err != nil {
			return err
		}
		for _, opt := range opts {
			if err := opt(mgr, ctl); err != nil {
				return err
			}
		}
		return nil
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
