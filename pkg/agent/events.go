package agent

import (
	"context"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/events"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// EventInterval is the least time between two Kubernetes Events of one
// kind about one replica: a replica failing under load fails every
// request in flight, and each is an engine event.
const EventInterval = 10 * time.Second

// ReportingController names the node's data path in the Events it
// writes; the instance is quorum-node-<node>.
const ReportingController = contract.NodeReportingController

// VolumeEvents turns what happens to the volumes a node serves into
// Warning Events on their QuorumVolumes: the engine's QUORUM_FAILURE and
// REPORT_BAD (at most one per kind and replica every EventInterval; the
// engine's log keeps every one) and volumes the node's data path lost.
type VolumeEvents struct {
	c    client.Client
	rec  events.EventRecorder
	node string

	mu   sync.Mutex
	last map[string]time.Time
}

// NewVolumeEvents writes Events through c for node.
func NewVolumeEvents(c client.Client, node string) *VolumeEvents {
	rec := contract.NewEventRecorder(c, ReportingController, ReportingController+"-"+node)
	return &VolumeEvents{c: c, rec: rec, node: node, last: map[string]time.Time{}}
}

// Engine records an engine event of the volume. The engine calls it on
// its request path: it never waits for the API server.
func (v *VolumeEvents) Engine(volumeID string, e quorum.Event) {
	key := volumeID + "/" + string(e.Type) + "/" + e.Child
	v.mu.Lock()
	if time.Since(v.last[key]) < EventInterval {
		v.mu.Unlock()
		return
	}
	v.last[key] = time.Now()
	v.mu.Unlock()
	note := fmt.Sprintf("%s of %d bytes at %d", e.Op, e.Length, e.Offset)
	if e.Child != "" {
		note += " on replica " + e.Child
	}
	if e.Error != "" {
		note += ": " + e.Error
	}
	go v.record(context.Background(), volumeID, string(e.Type), string(e.Op), note)
}

// Warning records a Warning Event about the volume, from this node.
func (v *VolumeEvents) Warning(ctx context.Context, volumeID, reason, action, note string) {
	v.record(ctx, volumeID, reason, action, note)
}

func (v *VolumeEvents) record(ctx context.Context, volumeID, reason, action, note string) {
	qv := &v1alpha1.QuorumVolume{}
	if err := v.c.Get(ctx, client.ObjectKey{Name: volumeID}, qv); err != nil {
		// The Event would regard nothing; the data path's log has it.
		return
	}
	v.rec.Eventf(qv, nil, corev1.EventTypeWarning, reason, action, "%s", note)
}
