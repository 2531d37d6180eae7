package scale

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// reportWorkers is how many volumes the simulated agents report at once.
// Real agents report in parallel, one volume at a time each; this many
// keeps the API server as busy as they would on a machine of two cores.
const reportWorkers = 16

// agents simulates the node agents of many nodes in one process: one
// watch of the QuorumVolumes for all of them, their Leases, and their
// replica reports. The volumes' phases as last seen are kept for the
// benchmark's waits.
type agents struct {
	c     client.Client // writes, and Lease reads, straight to the API server
	cache cache.Cache
	queue workqueue.TypedRateLimitingInterface[string]

	mu        sync.Mutex
	stop      map[string]context.CancelFunc // node -> stops its renewals; gone when lost
	lastRenew map[string]time.Time
	volumes   map[string]volumeState
	reports   int // applies sent
	errors    int // applies and renewals that failed
	lastErr   error
}

// volumeState is what the benchmark waits on: a volume's phase and the
// nodes of its replicas.
type volumeState struct {
	phase v1alpha1.VolumePhase
	nodes []string
}

// startAgents creates the Nodes, renews each one's Lease at once and
// then every contract.DefaultRenewInterval (each node at its own phase of
// the interval, as independent agents would), and starts reporting.
// Everything stops when ctx ends.
func startAgents(ctx context.Context, t testing.TB, rc *rest.Config, c client.Client, nodes []string) *agents {
	t.Helper()
	ca, err := cache.New(rc, cache.Options{Scheme: c.Scheme()})
	if err != nil {
		t.Fatalf("agents: cache: %v", err)
	}
	a := &agents{
		c: c, cache: ca,
		queue:     workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]()),
		stop:      map[string]context.CancelFunc{},
		lastRenew: map[string]time.Time{},
		volumes:   map[string]volumeState{},
	}
	parallel(t, len(nodes), func(i int) error {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodes[i], Labels: map[string]string{"kubernetes.io/hostname": nodes[i]}}}
		if err := c.Create(ctx, n); err != nil {
			return fmt.Errorf("create node %s: %w", nodes[i], err)
		}
		return a.renew(ctx, nodes[i])
	})
	for _, node := range nodes {
		nctx, cancel := context.WithCancel(ctx)
		a.stop[node] = cancel
		go a.keepRenewing(nctx, node)
	}

	inf, err := ca.GetInformer(ctx, &v1alpha1.QuorumVolume{})
	if err != nil {
		t.Fatalf("agents: informer: %v", err)
	}
	_, err = inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { a.seen(o) },
		UpdateFunc: func(_, o any) { a.seen(o) },
	})
	if err != nil {
		t.Fatalf("agents: event handler: %v", err)
	}
	go ca.Start(ctx)
	if !ca.WaitForCacheSync(ctx) {
		t.Fatal("agents: cache did not sync")
	}
	go func() {
		<-ctx.Done()
		a.queue.ShutDown()
	}()
	for range reportWorkers {
		go a.work(ctx)
	}
	return a
}

func (a *agents) renew(ctx context.Context, node string) error {
	err := contract.RenewLease(ctx, a.c, a.c, contract.DefaultNamespace, node, contract.DefaultLeaseDuration)
	a.mu.Lock()
	defer a.mu.Unlock()
	if err != nil && ctx.Err() != nil {
		return err // lost, or the end of the run
	}
	if err != nil {
		a.errors++
		a.lastErr = err
		return err
	}
	a.lastRenew[node] = time.Now()
	return nil
}

func (a *agents) keepRenewing(ctx context.Context, node string) {
	select {
	case <-ctx.Done():
		return
	case <-time.After(rand.N(contract.DefaultRenewInterval)):
	}
	tick := time.NewTicker(contract.DefaultRenewInterval)
	defer tick.Stop()
	for {
		if ctx.Err() == nil {
			a.renew(ctx, node)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// lose stops the renewals and reports of nodes at once, as if their
// agents died, and returns the time the last of their Leases expires.
func (a *agents) lose(nodes []string) time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	var expiry time.Time
	for _, n := range nodes {
		a.stop[n]()
		delete(a.stop, n)
		if e := a.lastRenew[n].Add(contract.DefaultLeaseDuration); e.After(expiry) {
			expiry = e
		}
	}
	return expiry
}

// seen records a volume's phase and queues it for its nodes' reports.
func (a *agents) seen(o any) {
	qv, ok := o.(*v1alpha1.QuorumVolume)
	if !ok {
		return
	}
	st := volumeState{phase: qv.Status.Phase}
	for _, r := range qv.Status.Replicas {
		st.nodes = append(st.nodes, r.Node)
	}
	a.mu.Lock()
	a.volumes[qv.Name] = st
	a.mu.Unlock()
	a.queue.Add(qv.Name)
}

func (a *agents) work(ctx context.Context) {
	for {
		name, shutdown := a.queue.Get()
		if shutdown {
			return
		}
		if err := a.report(ctx, name); err != nil && ctx.Err() == nil {
			a.mu.Lock()
			a.errors++
			a.lastErr = err
			a.mu.Unlock()
			a.queue.AddRateLimited(name)
		} else {
			a.queue.Forget(name)
		}
		a.queue.Done(name)
	}
}

// report does what the agent of each live node does on a change of the
// volume: report its replicas there Healthy, one apply per node, Stale
// entries left out.
func (a *agents) report(ctx context.Context, name string) error {
	qv := &v1alpha1.QuorumVolume{}
	if err := a.cache.Get(ctx, client.ObjectKey{Name: name}, qv); err != nil {
		return client.IgnoreNotFound(err)
	}
	if qv.DeletionTimestamp != nil {
		return nil
	}
	byNode := map[string][]agent.Report{}
	a.mu.Lock()
	for _, r := range qv.Status.Replicas {
		if a.stop[r.Node] == nil || r.State == v1alpha1.ReplicaStale {
			continue
		}
		byNode[r.Node] = append(byNode[r.Node], agent.Report{Name: r.Name, State: v1alpha1.ReplicaHealthy, Message: "simulated agent"})
	}
	a.mu.Unlock()
	for node, reps := range byNode {
		if err := agent.ReportReplicas(ctx, a.c, qv, node, node+":10809", time.Now(), reps); err != nil {
			return err
		}
		a.mu.Lock()
		a.reports++
		a.mu.Unlock()
	}
	return nil
}

// count is the number of volumes for which ok holds.
func (a *agents) count(ok func(string, volumeState) bool) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for name, st := range a.volumes {
		if ok(name, st) {
			n++
		}
	}
	return n
}

// stats is the count of applies sent, that of failed applies and
// renewals, and the last error.
func (a *agents) stats() (applies, failed int, last error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.reports, a.errors, a.lastErr
}

// parallel runs f(0) ... f(n-1) on 32 goroutines and fails t with the
// first error.
func parallel(t testing.TB, n int, f func(int) error) {
	t.Helper()
	next := make(chan int)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for i := range next {
				if err := f(i); err != nil {
					errs <- err
				}
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
}
