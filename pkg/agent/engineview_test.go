package agent_test

import (
	"context"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/datapath"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

// gatedChild reads only with a token from gate: the resync that copies
// from it advances one run per token.
type gatedChild struct {
	quorum.Child
	gate chan struct{}
}

func (g gatedChild) ReadAt(ctx context.Context, p []byte, off int64) error {
	select {
	case <-g.gate:
	case <-ctx.Done():
		return ctx.Err()
	}
	return g.Child.ReadAt(ctx, p, off)
}

// engineDataPath is a data path serving one volume with a real engine.
type engineDataPath struct {
	engine *quorum.Engine
	rec    datapath.Record
	staged atomic.Bool
}

func (d *engineDataPath) Ready(context.Context) error { return nil }
func (d *engineDataPath) List(context.Context) ([]datapath.Status, error) {
	if !d.staged.Load() {
		return nil, nil
	}
	return []datapath.Status{{Record: d.rec, Children: d.engine.Status()}}, nil
}

// TestEngineView runs the node's DataPathWatcher over a real engine whose
// third replica returns stale (it missed the whole volume) and resyncs
// one run at a time, against a real API server: the replica's
// outOfSyncBytes, resyncPercent and engineEpoch follow the engine while
// the node holds the Active attachment, progress at most once per
// ProgressInterval, nothing while nothing changes; unstaging withdraws
// them, and the end of the resync clears them.
func TestEngineView(t *testing.T) {
	srv, c := qvtest.Start(t)
	const size = 4 << 20 // four resync runs of 1 MiB
	qv := &v1alpha1.QuorumVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "resync"},
		Spec:       v1alpha1.QuorumVolumeSpec{Size: resource.MustParse("4Mi"), Replicas: 3},
	}
	if err := c.Create(t.Context(), qv); err != nil {
		t.Fatal(err)
	}
	qv.Status.Replicas = []v1alpha1.ReplicaStatus{
		{Name: "r0", Node: "n1", State: v1alpha1.ReplicaHealthy, Endpoint: "127.0.0.2:10809"},
		{Name: "r1", Node: "n2", State: v1alpha1.ReplicaHealthy, Endpoint: "127.0.0.3:10809"},
		{Name: "r2", Node: "n3", State: v1alpha1.ReplicaHealthy, Endpoint: "127.0.0.4:10809"},
	}
	// Another node is the Active attachment at first.
	qv.Status.Epoch, qv.Status.Attachments = 1, []v1alpha1.Attachment{{Node: "n9", Epoch: 1}}
	if err := c.Status().Update(t.Context(), qv); err != nil {
		t.Fatal(err)
	}

	// The engine's children are named as the CSI node stages them.
	names := []string{"nbds+unix:///resync?socket=%2Frun%2Fagent.sock", "nbds://127.0.0.3:10809/resync", "nbds://127.0.0.4:10809/resync"}
	dir := t.TempDir()
	gate := make(chan struct{})
	var members []quorum.Member
	for i, name := range names {
		path := filepath.Join(dir, string(rune('a'+i))+".img")
		if err := replica.Create([]string{path}, size); err != nil {
			t.Fatal(err)
		}
		f, err := replica.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		m := quorum.Member{Name: name, Child: gatedChild{f, gate}}
		if i == 2 {
			m.Child, m.Dirty = f, quorum.NewBitmap(size, quorum.DefaultRegionSize)
			m.Dirty.SetRange(0, size)
		}
		members = append(members, m)
	}
	engine, err := quorum.New(quorum.Config{Children: members})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(engine.Close)
	dp := &engineDataPath{engine: engine, rec: datapath.Record{StageRequest: datapath.StageRequest{VolumeID: "resync", Epoch: 2}}}
	dp.staged.Store(true)

	// The watcher's writes of the status, counted.
	var writes atomic.Int64
	wc, err := client.NewWithWatch(srv.Config, client.Options{Scheme: c.Scheme()})
	if err != nil {
		t.Fatal(err)
	}
	counted := interceptor.NewClient(wc, interceptor.Funcs{
		SubResourceApply: func(ctx context.Context, c client.Client, sub string, obj runtime.ApplyConfiguration, opts ...client.SubResourceApplyOption) error {
			writes.Add(1)
			return c.SubResource(sub).Apply(ctx, obj, opts...)
		},
		SubResourceUpdate: func(ctx context.Context, c client.Client, sub string, obj client.Object, opts ...client.SubResourceUpdateOption) error {
			writes.Add(1)
			return c.SubResource(sub).Update(ctx, obj, opts...)
		},
	})
	const progressEvery = time.Second
	w := &agent.DataPathWatcher{Client: counted, Node: "n1", DataPath: dp, Interval: 50 * time.Millisecond,
		ProgressInterval: progressEvery, Log: kubetest.Logger(t, "agent", "watch")}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { w.Run(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait() })

	// view is r2's engine view as the API shows it; the others must have
	// none.
	view := func(qv *v1alpha1.QuorumVolume) (bytes, epoch int64, percent int32) {
		for _, r := range qv.Status.Replicas {
			if r.Name != "r2" && (r.OutOfSyncBytes != 0 || r.EngineEpoch != 0 || r.ResyncPercent != nil) {
				t.Errorf("replica %s shows an engine view: %+v", r.Name, r)
			}
		}
		r := qv.Status.Replicas[2]
		percent = -1
		if r.ResyncPercent != nil {
			percent = *r.ResyncPercent
		}
		return r.OutOfSyncBytes, r.EngineEpoch, percent
	}
	waitView := func(what string, bytes, epoch int64, percent int32) {
		t.Helper()
		qvtest.WaitFor(t, c, "resync", what, 10*time.Second, func(qv *v1alpha1.QuorumVolume) bool {
			b, e, p := view(qv)
			return b == bytes && e == epoch && p == percent
		})
	}
	quiet := func(what string) {
		t.Helper()
		before := writes.Load()
		time.Sleep(progressEvery + 500*time.Millisecond)
		if n := writes.Load() - before; n != 0 {
			t.Errorf("%s: %d status writes, want none", what, n)
		}
	}

	// Not the node's Active attachment: nothing is written, however much
	// the engine misses.
	quiet("another node's Active attachment")
	waitView("no view", 0, 0, -1)

	// The node attaches with epoch 2: the replica misses the whole
	// volume; no resync runs yet.
	qv = qvtest.Get(t, c, "resync")
	qv.Status.Epoch, qv.Status.Attachments = 2, []v1alpha1.Attachment{{Node: "n1", Epoch: 2}}
	if err := c.Status().Update(t.Context(), qv); err != nil {
		t.Fatal(err)
	}
	waitView("r2 out of sync", size, 2, -1)
	quiet("nothing changes")

	engine.StartResync(2)
	waitView("the resync started", size, 2, 0)
	start, before := time.Now(), writes.Load()
	gate <- struct{}{}
	gate <- struct{}{}
	waitView("the resync half done", size/2, 2, 50)
	// Two steps of progress came within a moment; at most one write for
	// them came sooner than ProgressInterval after the last one.
	if n := writes.Load() - before; n > 2 || (n == 2 && time.Since(start) < progressEvery) {
		t.Errorf("%d writes in %s for two steps of progress, want at most one per %s", n, time.Since(start), progressEvery)
	}

	dp.staged.Store(false)
	waitView("unstaged: withdrawn", 0, 0, -1)
	dp.staged.Store(true)
	waitView("staged again", size/2, 2, 50)

	gate <- struct{}{}
	gate <- struct{}{}
	waitView("in sync: cleared", 0, 0, -1)
	if st := engine.Status()[2]; st.State != quorum.ChildHealthy {
		t.Errorf("engine shows r2 %+v, want healthy", st)
	}
	quiet("in sync")
	for _, mf := range qvtest.Get(t, c, "resync").ManagedFields {
		if mf.Manager == contract.EngineFieldManager("n1") && mf.FieldsV1 != nil && len(mf.FieldsV1.Raw) > len(`{"f:status":{}}`) {
			t.Errorf("%s still owns %s", mf.Manager, mf.FieldsV1.Raw)
		}
	}
}
