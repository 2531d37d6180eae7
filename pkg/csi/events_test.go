package csi

import (
	"context"
	"strings"
	"testing"
	"time"

	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// TestEngineEventsBecomeKubernetesEvents: the staged volume's engine
// events are Warning Events on the QuorumVolume, one per kind and replica
// within eventInterval, however many requests failed.
func TestEngineEventsBecomeKubernetesEvents(t *testing.T) {
	e := startEnv(t)
	qv := &v1alpha1.QuorumVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "events"},
		Spec:       v1alpha1.QuorumVolumeSpec{Size: resource.MustParse("64Mi"), Replicas: 3},
	}
	if err := e.c.Create(t.Context(), qv); err != nil {
		t.Fatal(err)
	}
	n := &Node{cfg: NodeConfig{NodeName: "n1", Events: e.c}}
	sink := n.eventSink(qv)
	for range 20 {
		sink(quorum.Event{Type: quorum.EventReportBad, Op: quorum.OpWrite, Offset: 4096, Length: 4096, Child: "r2", Error: "connection lost"})
	}
	sink(quorum.Event{Type: quorum.EventQuorumFailure, Op: quorum.OpWrite, Offset: 0, Length: 4096, Error: "1 of 3 children succeeded, threshold 2"})
	var got []eventsv1.Event
	deadline := time.Now().Add(10 * time.Second)
	for {
		var list eventsv1.EventList
		if err := e.c.List(context.Background(), &list, client.InNamespace(metav1.NamespaceDefault)); err != nil {
			t.Fatal(err)
		}
		got = got[:0]
		for _, ev := range list.Items {
			if ev.Regarding.Name == qv.Name && ev.ReportingController == "quorum-node" {
				got = append(got, ev)
			}
		}
		if len(got) >= 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	reasons := map[string]int{}
	for _, ev := range got {
		reasons[ev.Reason]++
		if ev.Type != "Warning" || ev.ReportingInstance != "quorum-node-n1" {
			t.Errorf("event %s: type %s from %s, want Warning from quorum-node-n1", ev.Name, ev.Type, ev.ReportingInstance)
		}
		if ev.Reason == "REPORT_BAD" && !strings.Contains(ev.Note, "replica r2: connection lost") {
			t.Errorf("REPORT_BAD note %q lacks the replica and the error", ev.Note)
		}
	}
	if reasons["REPORT_BAD"] != 1 || reasons["QUORUM_FAILURE"] != 1 {
		t.Fatalf("events by reason %v, want one REPORT_BAD (20 failures within %s) and one QUORUM_FAILURE", reasons, eventInterval)
	}
}
