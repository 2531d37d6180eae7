package controller

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/util/retry"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

func TestMain(m *testing.M) { kubetest.Main(m) }

// agentManager is the field manager the tests write replica states with,
// as a node agent would.
const agentManager = "quorum-agent"

// env is a real API server with the CRD, the agents' namespace, and a
// client that reads straight from the server.
type env struct {
	t *testing.T
	c client.Client
}

func startEnv(t *testing.T) (*env, *kubetest.Server) {
	srv, c := qvtest.Start(t)
	return &env{t: t, c: c}, srv
}

// startController runs the manager with the reconciler in-process until
// the test ends, and returns the reconciler's metrics registry.
func (e *env) startController(srv *kubetest.Server) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	srv.RunManager(e.t, ctrl.Options{Scheme: e.c.Scheme(), Cache: CacheOptions(contract.DefaultNamespace)}, func(mgr ctrl.Manager) error {
		r, err := New(mgr.GetClient(), mgr.GetEventRecorder(FieldManager), Options{Registerer: reg})
		if err != nil {
			return err
		}
		return r.SetupWithManager(mgr)
	})
	return reg
}

// node creates a Node labelled with its hostname and labels (pairs); an
// empty value removes the label, the hostname one included.
func (e *env) node(name string, labels ...string) {
	e.t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"kubernetes.io/hostname": name}}}
	for i := 0; i+1 < len(labels); i += 2 {
		n.Labels[labels[i]] = labels[i+1]
		if labels[i+1] == "" {
			delete(n.Labels, labels[i])
		}
	}
	if err := e.c.Create(e.t.Context(), n); err != nil {
		e.t.Fatalf("create node %s: %v", name, err)
	}
}

func (e *env) deleteNode(name string) {
	e.t.Helper()
	if err := e.c.Delete(e.t.Context(), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
		e.t.Fatalf("delete node %s: %v", name, err)
	}
}

// renew renews node's agent Lease once, as the agent does.
func (e *env) renew(node string, d time.Duration) {
	e.t.Helper()
	if err := contract.RenewLease(e.t.Context(), e.c, e.c, contract.DefaultNamespace, node, d); err != nil {
		e.t.Fatal(err)
	}
}

// keepRenewing renews node's Lease of duration d every d/4 until the
// returned stop is called (or the test ends).
func (e *env) keepRenewing(node string, d time.Duration) (stop func()) {
	e.renew(node, d)
	ctx, cancel := context.WithCancel(e.t.Context())
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(d / 4)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				if err := contract.RenewLease(ctx, e.c, e.c, contract.DefaultNamespace, node, d); err != nil && ctx.Err() == nil {
					e.t.Errorf("renew lease of %s: %v", node, err)
				}
			}
		}
	})
	stop = func() { cancel(); wg.Wait() }
	e.t.Cleanup(stop)
	return stop
}

func (e *env) createQV(name string, replicas int32, placement v1alpha1.Placement) {
	e.t.Helper()
	qv := &v1alpha1.QuorumVolume{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       v1alpha1.QuorumVolumeSpec{Size: resource.MustParse("1Gi"), Replicas: replicas, Placement: placement},
	}
	if err := e.c.Create(e.t.Context(), qv); err != nil {
		e.t.Fatalf("create QuorumVolume %s: %v", name, err)
	}
}

func (e *env) get(name string) *v1alpha1.QuorumVolume { return qvtest.Get(e.t, e.c, name) }

// waitFor polls volume name until ok holds, for up to 30 s.
func (e *env) waitFor(name, what string, ok func(*v1alpha1.QuorumVolume) bool) *v1alpha1.QuorumVolume {
	e.t.Helper()
	return qvtest.WaitFor(e.t, e.c, name, what, 30*time.Second, ok)
}

// waitGone waits until volume name no longer exists.
func (e *env) waitGone(name string) {
	e.t.Helper()
	err := wait.PollUntilContextTimeout(e.t.Context(), 50*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		err := e.c.Get(ctx, client.ObjectKey{Name: name}, &v1alpha1.QuorumVolume{})
		if err == nil {
			return false, nil
		}
		return true, client.IgnoreNotFound(err)
	})
	if err != nil {
		b, _ := yaml.Marshal(e.get(name))
		e.t.Fatalf("%s still exists: %v\n%s", name, err, b)
	}
}

// agentUpdate changes one replica entry as its node agent would: a
// read-modify-write of the status with the resourceVersion, retried on
// conflict, under the agent's own field manager. A nil change removes
// the entry.
func (e *env) agentUpdate(volume, replica string, change func(*v1alpha1.ReplicaStatus)) {
	e.t.Helper()
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		qv := &v1alpha1.QuorumVolume{}
		if err := e.c.Get(e.t.Context(), client.ObjectKey{Name: volume}, qv); err != nil {
			return err
		}
		found := false
		kept := qv.Status.Replicas[:0]
		for i := range qv.Status.Replicas {
			rep := qv.Status.Replicas[i]
			if rep.Name == replica {
				found = true
				if change == nil {
					continue
				}
				change(&rep)
			}
			kept = append(kept, rep)
		}
		if !found {
			return fmt.Errorf("no replica %s", replica)
		}
		qv.Status.Replicas = kept
		return e.c.Status().Update(e.t.Context(), qv, client.FieldOwner(agentManager))
	})
	if err != nil {
		e.t.Fatalf("agent update of %s/%s: %v", volume, replica, err)
	}
}

func (e *env) reportHealthy(volume, replica string) {
	e.t.Helper()
	e.agentUpdate(volume, replica, func(r *v1alpha1.ReplicaStatus) {
		r.State, r.Message, r.Endpoint = v1alpha1.ReplicaHealthy, "", r.Node+":10809"
		r.LastTransitionTime = metav1.Now()
	})
}

// waitEvent waits for an Event about volume with reason whose note
// contains text, and returns it.
func (e *env) waitEvent(volume, reason, eventType, text string) *eventsv1.Event {
	e.t.Helper()
	var found *eventsv1.Event
	var seen []string
	err := wait.PollUntilContextTimeout(e.t.Context(), 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		var list eventsv1.EventList
		if err := e.c.List(ctx, &list); err != nil {
			return false, err
		}
		seen = seen[:0]
		for i := range list.Items {
			ev := &list.Items[i]
			if ev.Regarding.Name != volume || ev.Regarding.Kind != "QuorumVolume" {
				continue
			}
			seen = append(seen, ev.Type+" "+ev.Reason+": "+ev.Note)
			if ev.Reason == reason && ev.Type == eventType && strings.Contains(ev.Note, text) {
				found = ev
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		e.t.Fatalf("no %s event %s %q about %s: %v; events about it:\n%s", eventType, reason, text, volume, err, strings.Join(seen, "\n"))
	}
	return found
}

func replicaOn(qv *v1alpha1.QuorumVolume, node string) *v1alpha1.ReplicaStatus {
	for i := range qv.Status.Replicas {
		if qv.Status.Replicas[i].Node == node {
			return &qv.Status.Replicas[i]
		}
	}
	return nil
}

func nodesOf(qv *v1alpha1.QuorumVolume) []string {
	var nodes []string
	for _, r := range qv.Status.Replicas {
		nodes = append(nodes, r.Node)
	}
	return nodes
}
