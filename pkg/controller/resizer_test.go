package controller

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

func TestResizeTarget(t *testing.T) {
	const (
		none       = corev1.ClaimResourceStatus("")
		inProgress = corev1.PersistentVolumeClaimControllerResizeInProgress
		infeasible = corev1.PersistentVolumeClaimControllerResizeInfeasible
		pending    = corev1.PersistentVolumeClaimNodeResizePending
	)
	for _, tc := range []struct {
		name                   string
		request, pv, allocated string
		status                 corev1.ClaimResourceStatus
		fsPending, finalError  bool
		want                   string // "" for nothing to do
	}{
		{name: "new request", request: "2Mi", pv: "1Mi", want: "2Mi"},
		{name: "retry in progress at the allocated size", request: "3Mi", pv: "1Mi", allocated: "2Mi", status: inProgress, want: "2Mi"},
		{name: "after a final error the request counts", request: "3Mi", pv: "1Mi", allocated: "2Mi", status: inProgress, finalError: true, want: "3Mi"},
		{name: "infeasible: a lowered request counts", request: "2Mi", pv: "1Mi", allocated: "8Ei", status: infeasible, want: "2Mi"},
		{name: "node pending, request raised again: wait for the node", request: "3Mi", pv: "2Mi", allocated: "2Mi", status: pending},
		{name: "node pending, then shrunk", request: "1536Ki", pv: "2Mi", allocated: "2Mi", status: pending},
		{name: "PV grown, claim status not yet written", request: "2Mi", pv: "2Mi", allocated: "2Mi", status: inProgress, want: "2Mi"},
		{name: "PV grown by another resizer, waiting for the node", request: "2Mi", pv: "2Mi", status: none, fsPending: true},
		{name: "PV larger than a fresh request", request: "2Mi", pv: "4Mi", want: "2Mi"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pvc := &corev1.PersistentVolumeClaim{}
			pvc.Spec.Resources.Requests = corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(tc.request)}
			if tc.allocated != "" {
				pvc.Status.AllocatedResources = corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(tc.allocated)}
			}
			if tc.status != none {
				pvc.Status.AllocatedResourceStatuses = map[corev1.ResourceName]corev1.ClaimResourceStatus{corev1.ResourceStorage: tc.status}
			}
			if tc.fsPending {
				pvc.Status.Conditions = []corev1.PersistentVolumeClaimCondition{{Type: corev1.PersistentVolumeClaimFileSystemResizePending, Status: corev1.ConditionTrue}}
			}
			pv := &corev1.PersistentVolume{}
			pv.Spec.Capacity = corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(tc.pv)}
			got, ok := resizeTarget(pvc, pv, tc.finalError)
			switch {
			case tc.want == "" && ok:
				t.Errorf("target %s, want nothing to do", got.String())
			case tc.want != "" && (!ok || got.Cmp(resource.MustParse(tc.want)) != 0):
				t.Errorf("target %s (%v), want %s", got.String(), ok, tc.want)
			}
		})
	}
}
