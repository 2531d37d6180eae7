package contract

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/events"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/apiutil"
	"sigs.k8s.io/controller-runtime/pkg/log"
)

// eventTimeout bounds one Event's write: an Event is for people, never
// part of a decision, and must not hold up its caller for long.
const eventTimeout = 10 * time.Second

// EventRecorder writes events.k8s.io/v1 Events through a client, one
// Create per Event, before Eventf returns. It is the recorder of the code
// that has a client but no manager's broadcaster: the CSI controller's
// Attach and Detach and the node's data path and watcher. The reconcilers
// record through their manager's recorder (mgr.GetEventRecorder); both
// are an events.EventRecorder, the one way Events are written.
type EventRecorder struct {
	c          client.Client
	controller string
	instance   string
}

var _ events.EventRecorder = (*EventRecorder)(nil)

// NewEventRecorder records through c, which must know the kinds of the
// objects it is asked about and events.k8s.io/v1 (client-go's scheme has
// the latter), as reportingController controller and reportingInstance
// instance.
func NewEventRecorder(c client.Client, controller, instance string) *EventRecorder {
	return &EventRecorder{c: c, controller: controller, instance: instance}
}

// Eventf writes an Event of eventtype (Normal or Warning) regarding
// regarding (and related, if not nil). A failure is logged, not
// returned: the Event is for people, never part of a decision.
func (r *EventRecorder) Eventf(regarding, related runtime.Object, eventtype, reason, action, note string, args ...any) {
	ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
	defer cancel()
	ref, err := r.reference(regarding)
	if err != nil {
		log.FromContext(ctx).Error(err, "record event", "reason", reason)
		return
	}
	now := time.Now()
	ev := &eventsv1.Event{
		ObjectMeta: metav1.ObjectMeta{
			// Events of cluster-scoped objects live in "default", as
			// client-go's recorders put them.
			Namespace: ref.Namespace,
			Name:      fmt.Sprintf("%s.%x", ref.Name, now.UnixNano()),
		},
		EventTime:           metav1.NewMicroTime(now),
		ReportingController: r.controller,
		ReportingInstance:   r.instance,
		Action:              action,
		Reason:              reason,
		Regarding:           ref,
		Note:                fmt.Sprintf(note, args...),
		Type:                eventtype,
	}
	if ev.Namespace == "" {
		ev.Namespace = metav1.NamespaceDefault
	}
	if related != nil {
		if rel, err := r.reference(related); err == nil {
			ev.Related = &rel
		}
	}
	if err := r.c.Create(ctx, ev); err != nil {
		log.FromContext(ctx).Error(err, "record event", "regarding", ref.Name, "reason", reason)
	}
}

// reference names o in an Event.
func (r *EventRecorder) reference(o runtime.Object) (corev1.ObjectReference, error) {
	m, err := meta.Accessor(o)
	if err != nil {
		return corev1.ObjectReference{}, err
	}
	gvk, err := apiutil.GVKForObject(o, r.c.Scheme())
	if err != nil {
		return corev1.ObjectReference{}, err
	}
	return corev1.ObjectReference{
		APIVersion: gvk.GroupVersion().String(), Kind: gvk.Kind,
		Namespace: m.GetNamespace(), Name: m.GetName(), UID: m.GetUID(), ResourceVersion: m.GetResourceVersion(),
	}, nil
}
