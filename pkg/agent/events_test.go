package agent_test

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/datapath"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// eventsClient is a client of a fresh API server with the CRD installed
// that also writes Events.
func eventsClient(t *testing.T) client.Client {
	_, c := qvtest.Start(t)
	return c
}

func createEventsVolume(t *testing.T, c client.Client, name string, attachedTo ...string) {
	qv := &v1alpha1.QuorumVolume{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       v1alpha1.QuorumVolumeSpec{Size: resource.MustParse("64Mi"), Replicas: 3},
	}
	if err := c.Create(t.Context(), qv); err != nil {
		t.Fatal(err)
	}
	if len(attachedTo) == 0 {
		return
	}
	qv.Status.Epoch = int64(len(attachedTo))
	for i, n := range attachedTo {
		qv.Status.Attachments = append(qv.Status.Attachments, v1alpha1.Attachment{Node: n, Epoch: int64(i + 1)})
	}
	if err := c.Status().Update(t.Context(), qv); err != nil {
		t.Fatal(err)
	}
}

// warnings lists the Warning Events about volume with reason.
func warnings(ctx context.Context, c client.Client, volume, reason string) []eventsv1.Event {
	var list eventsv1.EventList
	if err := c.List(ctx, &list, client.InNamespace(metav1.NamespaceDefault)); err != nil {
		return nil
	}
	var got []eventsv1.Event
	for _, ev := range list.Items {
		if ev.Regarding.Name == volume && ev.Reason == reason && ev.Type == corev1.EventTypeWarning && ev.ReportingController == agent.ReportingController {
			got = append(got, ev)
		}
	}
	return got
}

// TestEngineEventsBecomeKubernetesEvents: a staged volume's engine events
// are Warning Events on the QuorumVolume, one per kind and replica
// within agent.EventInterval, however many requests failed.
func TestEngineEventsBecomeKubernetesEvents(t *testing.T) {
	c := eventsClient(t)
	createEventsVolume(t, c, "events")
	ev := agent.NewVolumeEvents(c, "n1")
	for range 20 {
		ev.Engine("events", quorum.Event{Type: quorum.EventReportBad, Op: quorum.OpWrite, Offset: 4096, Length: 4096, Child: "r2", Error: "connection lost"})
	}
	ev.Engine("events", quorum.Event{Type: quorum.EventQuorumFailure, Op: quorum.OpWrite, Offset: 0, Length: 4096, Error: "1 of 3 children succeeded, threshold 2"})
	var bad, failed []eventsv1.Event
	qvtest.Poll(t, "the two Events", 10*time.Second, func(ctx context.Context) bool {
		bad, failed = warnings(ctx, c, "events", "REPORT_BAD"), warnings(ctx, c, "events", "QUORUM_FAILURE")
		return len(bad) >= 1 && len(failed) >= 1
	})
	time.Sleep(time.Second) // any extra Event would have been written by now
	bad, failed = warnings(t.Context(), c, "events", "REPORT_BAD"), warnings(t.Context(), c, "events", "QUORUM_FAILURE")
	if len(bad) != 1 || len(failed) != 1 {
		t.Fatalf("%d REPORT_BAD and %d QUORUM_FAILURE Events, want one each (20 failures within %s)", len(bad), len(failed), agent.EventInterval)
	}
	if e := bad[0]; e.ReportingInstance != "quorum-node-n1" || !strings.Contains(e.Note, "replica r2: connection lost") {
		t.Errorf("REPORT_BAD from %q with note %q: want quorum-node-n1, naming the replica and the error", e.ReportingInstance, e.Note)
	}
}

// TestDataPathWatcher runs the watcher against a real data path service
// and API server: a volume the data path lost (its record is corrupt)
// and, later, a data path that stops answering both turn the node's
// attachments' DataPathReady False with a Warning Event naming the node,
// within seconds; a data path back up turns the served ones True.
func TestDataPathWatcher(t *testing.T) {
	c := eventsClient(t)
	createEventsVolume(t, c, "lost", "n1")
	createEventsVolume(t, c, "fine", "n1")
	createEventsVolume(t, c, "elsewhere", "n2")

	state := t.TempDir()
	if err := os.MkdirAll(filepath.Join(state, "volumes"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(state, "volumes", "lost.json"), []byte(`{"version":1,"volumeID":"lo`), 0o600); err != nil {
		t.Fatal(err)
	}
	svc, err := datapath.New(datapath.Config{StateDir: state, Frontend: "fuse-loop"})
	if err != nil {
		t.Fatal(err)
	}
	svc.TakeOver(t.Context())
	sock := filepath.Join(t.TempDir(), "datapath.sock")
	serve := func() *http.Server {
		l, err := datapath.Listen(sock)
		if err != nil {
			t.Fatal(err)
		}
		hs := &http.Server{Handler: (&datapath.Server{Service: svc}).Handler()}
		go hs.Serve(l)
		return hs
	}
	hs := serve()
	w := &agent.DataPathWatcher{
		Client: c, Node: "n1", DataPath: datapath.NewClient(sock), Events: agent.NewVolumeEvents(c, "n1"),
		Interval: 200 * time.Millisecond, Grace: time.Second, Log: kubetest.Logger(t, "agent", "watch"),
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		hs.Close()
	})

	ready := func(name, node string) *metav1.Condition {
		qv := qvtest.Get(t, c, name)
		for _, a := range qv.Status.Attachments {
			if a.Node == node {
				return meta.FindStatusCondition(a.Conditions, v1alpha1.AttachmentDataPathReady)
			}
		}
		return nil
	}
	waitCond := func(name string, status metav1.ConditionStatus, msg string) {
		t.Helper()
		qvtest.Poll(t, name+" DataPathReady "+string(status), 10*time.Second, func(context.Context) bool {
			c := ready(name, "n1")
			return c != nil && c.Status == status && strings.Contains(c.Message, msg)
		})
	}
	waitCond("lost", metav1.ConditionFalse, "corrupt")
	waitCond("fine", metav1.ConditionTrue, "serves")
	if c := ready("elsewhere", "n2"); c != nil {
		t.Errorf("n1's watcher set a condition on n2's attachment: %+v", c)
	}
	qvtest.Poll(t, "a Warning Event about the lost volume", 10*time.Second, func(ctx context.Context) bool {
		evs := warnings(ctx, c, "lost", "DataPathNotServing")
		return len(evs) == 1 && evs[0].ReportingInstance == "quorum-node-n1"
	})

	hs.Close()
	start := time.Now()
	waitCond("fine", metav1.ConditionFalse, "node n1 does not answer")
	t.Logf("a data path that stopped answering showed in the API after %s", time.Since(start).Round(time.Millisecond))
	qvtest.Poll(t, "a Warning Event about the served volume", 10*time.Second, func(ctx context.Context) bool {
		return len(warnings(ctx, c, "fine", "DataPathNotServing")) == 1
	})

	hs = serve()
	waitCond("fine", metav1.ConditionTrue, "serves")
	waitCond("lost", metav1.ConditionFalse, "corrupt")
}
