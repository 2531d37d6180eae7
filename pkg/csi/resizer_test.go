package csi

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/controller"
)

// resizeEnv is env with the resizer running in its manager and a
// StorageClass that allows expansion, as the API server's
// PersistentVolumeClaimResize admission requires.
type resizeEnv struct{ *env }

const expandableClass = "expandable"

func startResizeEnv(t *testing.T) resizeEnv {
	e := startEnv(t, func(mgr ctrl.Manager, ctl *Controller) error {
		return controller.NewResizer(mgr.GetClient(), ctl, mgr.GetEventRecorder(controller.ResizerName)).SetupWithManager(t.Context(), mgr)
	})
	sc := &storagev1.StorageClass{
		ObjectMeta:           metav1.ObjectMeta{Name: expandableClass},
		Provisioner:          DriverName,
		AllowVolumeExpansion: ptr.To(true),
	}
	if err := e.c.Create(t.Context(), sc); err != nil {
		t.Fatal(err)
	}
	return resizeEnv{e}
}

// claim makes a PVC bound to a PV of driver for volume handle, as the
// provisioner and the PV controller (neither runs here) leave them:
// PV capacity and claim status.capacity size, claim request request.
func (e resizeEnv) claim(name, driver, handle, size, request string) *corev1.PersistentVolumeClaim {
	e.t.Helper()
	ctx := e.t.Context()
	rwo := []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: metav1.NamespaceDefault},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      rwo,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(request)}},
			StorageClassName: ptr.To(expandableClass),
			VolumeName:       "pv-" + name,
		},
	}
	if err := e.c.Create(ctx, pvc); err != nil {
		e.t.Fatalf("create PVC %s: %v", name, err)
	}
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "pv-" + name},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                      corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(size)},
			AccessModes:                   rwo,
			StorageClassName:              expandableClass,
			PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimDelete,
			ClaimRef:                      &corev1.ObjectReference{Kind: "PersistentVolumeClaim", Namespace: pvc.Namespace, Name: pvc.Name, UID: pvc.UID},
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: driver, VolumeHandle: handle, FSType: "ext4",
			}},
		},
	}
	if err := e.c.Create(ctx, pv); err != nil {
		e.t.Fatalf("create PV %s: %v", pv.Name, err)
	}
	pvc.Status = corev1.PersistentVolumeClaimStatus{
		Phase: corev1.ClaimBound, AccessModes: rwo,
		Capacity: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(size)},
	}
	if err := e.c.Status().Update(ctx, pvc); err != nil {
		e.t.Fatalf("bind PVC %s: %v", name, err)
	}
	return pvc
}

// request sets the claim's storage request as a user does. The resize
// admission reads StorageClasses through an informer, so the first
// attempts may be refused until it has seen the class.
func (e resizeEnv) request(name, size string) {
	e.t.Helper()
	e.poll("PVC "+name+" request "+size+" accepted", func(ctx context.Context) bool {
		pvc := e.pvc(name)
		pvc.Spec.Resources.Requests[corev1.ResourceStorage] = resource.MustParse(size)
		err := e.c.Update(ctx, pvc)
		if err != nil {
			e.t.Logf("update PVC %s request to %s: %v", name, size, err)
		}
		return err == nil
	})
}

func (e resizeEnv) pvc(name string) *corev1.PersistentVolumeClaim {
	e.t.Helper()
	pvc := &corev1.PersistentVolumeClaim{}
	if err := e.c.Get(e.t.Context(), client.ObjectKey{Namespace: metav1.NamespaceDefault, Name: name}, pvc); err != nil {
		e.t.Fatal(err)
	}
	return pvc
}

func (e resizeEnv) pvCapacity(name string) resource.Quantity {
	e.t.Helper()
	pv := &corev1.PersistentVolume{}
	if err := e.c.Get(e.t.Context(), client.ObjectKey{Name: "pv-" + name}, pv); err != nil {
		e.t.Fatal(err)
	}
	return pv.Spec.Capacity[corev1.ResourceStorage]
}

// events lists the resizer's Events about claim name, oldest first.
func (e resizeEnv) events(name string) []eventsv1.Event {
	e.t.Helper()
	var list eventsv1.EventList
	if err := e.c.List(e.t.Context(), &list, client.InNamespace(metav1.NamespaceDefault)); err != nil {
		e.t.Fatal(err)
	}
	var got []eventsv1.Event
	for _, ev := range list.Items {
		if ev.Regarding.Kind == "PersistentVolumeClaim" && ev.Regarding.Name == name && ev.ReportingController == controller.ResizerName {
			got = append(got, ev)
		}
	}
	slices.SortFunc(got, func(a, b eventsv1.Event) int { return a.EventTime.Compare(b.EventTime.Time) })
	return got
}

// waitEvent waits for an Event of reason and type about claim name whose
// note contains text.
func (e resizeEnv) waitEvent(name, typ, reason, text string) {
	e.t.Helper()
	e.poll("a "+typ+" "+reason+" Event on PVC "+name, func(context.Context) bool {
		return slices.ContainsFunc(e.events(name), func(ev eventsv1.Event) bool {
			return ev.Type == typ && ev.Reason == reason && strings.Contains(ev.Note, text)
		})
	})
}

// unchanged fails if ok stops holding within 2 s: long enough for the
// resizer, which reacts within milliseconds, to have acted.
func (e resizeEnv) unchanged(what string, ok func() bool) {
	e.t.Helper()
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if !ok() {
			e.t.Fatalf("%s changed", what)
		}
	}
}

// resizeConditions are the claim conditions of an expansion.
var resizeConditions = map[corev1.PersistentVolumeClaimConditionType]bool{
	corev1.PersistentVolumeClaimResizing:                true,
	corev1.PersistentVolumeClaimFileSystemResizePending: true,
	corev1.PersistentVolumeClaimControllerResizeError:   true,
	corev1.PersistentVolumeClaimNodeResizeError:         true,
}

// claimState is what a resize changes, as one comparable value.
type claimState struct {
	volumeSize, pvCapacity, capacity, allocated string
	status                                      corev1.ClaimResourceStatus
	conditions                                  string // resize condition types, sorted, joined by ","
}

func (e resizeEnv) state(name, volume string) claimState {
	e.t.Helper()
	pvc := e.pvc(name)
	pvCap := e.pvCapacity(name)
	s := claimState{
		pvCapacity: pvCap.String(),
		status:     pvc.Status.AllocatedResourceStatuses[corev1.ResourceStorage],
	}
	if q, ok := pvc.Status.Capacity[corev1.ResourceStorage]; ok {
		s.capacity = q.String()
	}
	if q, ok := pvc.Status.AllocatedResources[corev1.ResourceStorage]; ok {
		s.allocated = q.String()
	}
	if volume != "" {
		s.volumeSize = e.get(volume).Spec.Size.String()
	}
	var conds []string
	for _, c := range pvc.Status.Conditions {
		if resizeConditions[c.Type] && c.Status == corev1.ConditionTrue {
			conds = append(conds, string(c.Type))
		}
	}
	slices.Sort(conds)
	s.conditions = strings.Join(conds, ",")
	return s
}

func (e resizeEnv) volume(name, size string) string {
	e.t.Helper()
	q := resource.MustParse(size)
	return e.create(createReq(name, q.Value(), map[string]string{ParamReplicas: "1"})).GetVolumeId()
}

// TestResizer raises PVC requests against a real API server with the
// resizer, the reconciler and the CSI Controller service running, and
// checks what external-resizer would have left for the kubelet.
func TestResizer(t *testing.T) {
	re := startResizeEnv(t)
	re.node("node-a")

	growing := func(size string) claimState {
		return claimState{volumeSize: size, pvCapacity: size, capacity: "1Mi", allocated: size,
			status: corev1.PersistentVolumeClaimNodeResizePending, conditions: "FileSystemResizePending,Resizing"}
	}
	unchanged := claimState{volumeSize: "1Mi", pvCapacity: "1Mi", capacity: "1Mi"}
	// claimed is re for subtest t, with a 1 MiB volume and a claim of it
	// both named name; it returns the volume's ID.
	claimed := func(t *testing.T, name string) (resizeEnv, string) {
		e := resizeEnv{re.env}
		e.t = t
		vol := e.volume(name, "1Mi")
		e.claim(name, DriverName, vol, "1Mi", "1Mi")
		return e, vol
	}
	for _, tc := range []struct {
		name    string
		driver  string
		volume  bool   // a QuorumVolume exists behind the PV
		size    string // volume, PV and claim status.capacity
		request string // the claim's request: raised to it, or made with it when below size
		want    claimState
		events  []string // "Type/Reason" of the resizer's Events, in order
		note    string   // in the last Event's note
	}{{
		name: "grow", driver: DriverName, volume: true, size: "1Mi", request: "2Mi",
		want:   growing("2Mi"),
		events: []string{"Normal/Resizing", "Normal/FileSystemResizeRequired"},
	}, {
		name: "too large", driver: DriverName, volume: true, size: "1Mi", request: "9223372036854775807",
		want: claimState{volumeSize: "1Mi", pvCapacity: "1Mi", capacity: "1Mi", allocated: "9223372036854775807",
			status: corev1.PersistentVolumeClaimControllerResizeInfeasible, conditions: "ControllerResizeError,Resizing"},
		events: []string{"Normal/Resizing", "Warning/VolumeResizeFailed"}, note: "too large",
	}, {
		name: "volume gone", driver: DriverName, size: "1Mi", request: "2Mi",
		want: claimState{pvCapacity: "1Mi", capacity: "1Mi", allocated: "2Mi",
			status: corev1.PersistentVolumeClaimControllerResizeInfeasible, conditions: "ControllerResizeError,Resizing"},
		events: []string{"Normal/Resizing", "Warning/VolumeResizeFailed"}, note: "not found",
	}, {
		name: "request below the volume", driver: DriverName, volume: true, size: "2Mi", request: "1Mi",
		want: claimState{volumeSize: "2Mi", pvCapacity: "2Mi", capacity: "2Mi"},
	}, {
		name: "other driver", driver: "other.csi.example.com", size: "1Mi", request: "2Mi",
		want: claimState{pvCapacity: "1Mi", capacity: "1Mi"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			e := resizeEnv{re.env}
			e.t = t
			name := "c-" + strings.ReplaceAll(tc.name, " ", "-")
			handle := name
			if tc.volume {
				handle = e.volume(name, tc.size)
			}
			initial := tc.size
			if q, s := resource.MustParse(tc.request), resource.MustParse(tc.size); q.Cmp(s) < 0 {
				initial = tc.request
			}
			e.claim(name, tc.driver, handle, tc.size, initial)
			if initial != tc.request {
				e.request(name, tc.request)
			}
			volume := ""
			if tc.volume {
				volume = handle
			}
			if tc.want.status != "" {
				e.poll("PVC "+name+" status "+string(tc.want.status), func(context.Context) bool {
					return e.state(name, volume).status == tc.want.status
				})
			} else {
				e.unchanged("PVC "+name, func() bool { return e.state(name, volume) == tc.want })
			}
			if got := e.state(name, volume); got != tc.want {
				t.Errorf("state\n got %+v\nwant %+v", got, tc.want)
			}
			// Events are written asynchronously, after the status.
			var evs []eventsv1.Event
			kinds := func() []string {
				var got []string
				evs = e.events(name)
				for _, ev := range evs {
					got = append(got, ev.Type+"/"+ev.Reason)
				}
				return got
			}
			qvtest.Poll(t, "events of "+name, 10*time.Second, func(context.Context) bool { return len(kinds()) >= len(tc.events) })
			if got := kinds(); !slices.Equal(got, tc.events) {
				t.Errorf("events %v, want %v", got, tc.events)
			}
			if tc.note != "" && len(evs) > 0 && !strings.Contains(evs[len(evs)-1].Note, tc.note) {
				t.Errorf("last event's note %q does not say %q", evs[len(evs)-1].Note, tc.note)
			}
		})
	}

	t.Run("recover from infeasible", func(t *testing.T) {
		e, vol := claimed(t, "c-recover")
		e.request("c-recover", "9223372036854775807")
		e.poll("c-recover infeasible", func(context.Context) bool {
			return e.state("c-recover", vol).status == corev1.PersistentVolumeClaimControllerResizeInfeasible
		})
		// Lowering the request, which the API server allows down to
		// status.capacity, is the way out; the new size is tried at once,
		// not after the resizer's infeasibleRetry, and its Resizing
		// condition replaces the error's.
		e.request("c-recover", "2Mi")
		want := growing("2Mi")
		e.poll("c-recover expanded to 2 MiB", func(context.Context) bool { return e.state("c-recover", vol) == want })
	})

	t.Run("shrink while the node expands", func(t *testing.T) {
		e, vol := claimed(t, "c-shrink")
		e.request("c-shrink", "2Mi")
		want := growing("2Mi")
		e.poll("c-shrink expanded", func(context.Context) bool { return e.state("c-shrink", vol) == want })
		// The API server allows lowering the request down to
		// status.capacity (to recover from failures); the volume does not
		// shrink and the kubelet still grows the filesystem to 2 MiB.
		e.request("c-shrink", "1536Ki")
		e.unchanged("c-shrink", func() bool { return e.state("c-shrink", vol) == want })
		if n := len(e.events("c-shrink")); n != 2 {
			t.Errorf("%d events, want the 2 of the expansion", n)
		}
	})

	t.Run("published", func(t *testing.T) {
		e, vol := claimed(t, "c-published")
		ctx := t.Context()
		if _, err := e.ctl.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{
			VolumeId: vol, NodeId: "node-a", VolumeCapability: mountCap(snw, ""),
		}); err != nil {
			t.Fatal(err)
		}
		e.request("c-published", "2Mi")
		e.waitEvent("c-published", corev1.EventTypeWarning, controller.ReasonVolumeResizeFailed, "waiting for it to be unpublished")
		e.unchanged("c-published", func() bool { return e.state("c-published", vol) == unchanged })
		if _, err := e.ctl.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: vol, NodeId: "node-a"}); err != nil {
			t.Fatal(err)
		}
		want := growing("2Mi")
		e.poll("c-published expanded once unpublished", func(context.Context) bool { return e.state("c-published", vol) == want })
		e.waitEvent("c-published", corev1.EventTypeNormal, controller.ReasonFileSystemResizeRequired, "")
	})
}
