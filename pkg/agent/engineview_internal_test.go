package agent

import (
	"context"
	"errors"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/datapath"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

func TestViewOf(t *testing.T) {
	children := []quorum.ChildStatus{
		{Name: "a", State: quorum.ChildHealthy},
		{Name: "b", State: quorum.ChildFaulty, DirtyBytes: 8192},
		{Name: "c", State: quorum.ChildResyncing, DirtyBytes: 3000, ResyncDone: 1000, ResyncTotal: 4000},
	}
	staged := func(mutate func(*datapath.Status)) datapath.Status {
		st := datapath.Status{Record: datapath.Record{StageRequest: datapath.StageRequest{VolumeID: "v", Epoch: 7}}, Children: children}
		mutate(&st)
		return st
	}
	all := map[string]progress{"b": {bytes: 8192, percent: -1}, "c": {bytes: 3000, percent: 25}}
	tests := []struct {
		name string
		st   datapath.Status
		want map[string]progress
	}{
		{"active", staged(func(*datapath.Status) {}), all},
		{"standby: its engine does not resync", staged(func(st *datapath.Status) { st.Standby = true }), map[string]progress{}},
		{"fenced: another attachment writes", staged(func(st *datapath.Status) { st.Fenced = true }), map[string]progress{}},
		{"lost", staged(func(st *datapath.Status) { st.Lost = "corrupt record" }), map[string]progress{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := viewOf(tt.st); !got.equal(engineView{epoch: 7, children: tt.want}) {
				t.Errorf("view %+v, want epoch 7 and %+v", got, tt.want)
			}
		})
	}
}

// TestEngineReporterSchedule: when the reporter writes a volume's view
// (each write starts with a Get, counted here), step by step on a clock.
func TestEngineReporterSchedule(t *testing.T) {
	scheme := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	qv := &v1alpha1.QuorumVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "v"},
		Status: v1alpha1.QuorumVolumeStatus{
			Attachments: []v1alpha1.Attachment{{Node: "n1", Epoch: 2}},
			Replicas:    []v1alpha1.ReplicaStatus{{Name: "r1", Node: "n2", State: v1alpha1.ReplicaHealthy, Endpoint: "10.0.0.2:10809"}},
		},
	}
	var gets int
	var getErr error
	c := interceptor.NewClient(fake.NewClientBuilder().WithScheme(scheme).Build(), interceptor.Funcs{
		Get: func(_ context.Context, _ client.WithWatch, _ client.ObjectKey, obj client.Object, _ ...client.GetOption) error {
			gets++
			qv.DeepCopyInto(obj.(*v1alpha1.QuorumVolume))
			return getErr
		},
		SubResourceApply: func(context.Context, client.Client, string, runtime.ApplyConfiguration, ...client.SubResourceApplyOption) error {
			return nil
		},
	})
	r := &engineReporter{c: c, node: "n1", interval: 5 * time.Second}
	behind := func(bytes int64, percent int32) map[string]engineView {
		return map[string]engineView{"v": {epoch: 2, children: map[string]progress{"nbds://10.0.0.2:10809/v": {bytes, percent}}}}
	}
	inSync := map[string]engineView{"v": {epoch: 2, children: map[string]progress{}}}
	t0 := time.Now()
	steps := []struct {
		name    string
		at      time.Duration
		views   map[string]engineView
		standby bool  // the node's attachment is a Standby
		getErr  error // the API answers Get with it
		want    int   // writes
	}{
		{"first look", 0, behind(4096, -1), false, nil, 1},
		{"nothing changed", time.Second, behind(4096, -1), false, nil, 0},
		{"progress, too soon", 2 * time.Second, behind(4096, 0), false, nil, 0},
		{"progress, due", 5 * time.Second, behind(4096, 0), false, nil, 1},
		{"in sync: at once", 5500 * time.Millisecond, inSync, false, nil, 1},
		{"behind again: at once, and fails", 6 * time.Second, behind(100, -1), false, errors.New("refused"), 1},
		{"failed: not before the interval", 7 * time.Second, behind(100, -1), false, nil, 0},
		{"failed: again once due", 11 * time.Second, behind(100, -1), false, nil, 1},
		{"unstaged: withdrawn", 12 * time.Second, nil, false, nil, 1},
		{"unstaged and withdrawn: nothing", 13 * time.Second, nil, false, nil, 0},
		{"staged as a Standby: looked up", 20 * time.Second, behind(100, -1), true, nil, 1},
		{"held: not before the interval", 21 * time.Second, behind(100, -1), true, nil, 0},
		{"held: again once due", 25 * time.Second, behind(100, -1), true, nil, 1},
		{"activated: shown once due", 30 * time.Second, behind(100, -1), false, nil, 1},
		{"shown: nothing", 31 * time.Second, behind(100, -1), false, nil, 0},
	}
	for _, s := range steps {
		qv.Status.Attachments[0].Role = v1alpha1.AttachmentActive
		if s.standby {
			qv.Status.Attachments[0].Role = v1alpha1.AttachmentStandby
		}
		gets, getErr = 0, s.getErr
		err := r.report(t.Context(), s.views, t0.Add(s.at))
		if gets != s.want || (err != nil) != (s.getErr != nil) {
			t.Errorf("%s: %d writes (%v), want %d", s.name, gets, err, s.want)
		}
	}
}
