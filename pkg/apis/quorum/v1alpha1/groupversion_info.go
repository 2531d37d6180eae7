package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupVersion is the API group and version of every type in this package.
var GroupVersion = schema.GroupVersion{Group: "quorum.csi.dev", Version: "v1alpha1"}

var (
	// SchemeBuilder registers this package's types; apimachinery's own
	// builder keeps the API package free of controller-runtime, so clients
	// that only read QuorumVolumes do not pull it in.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds this package's types to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion, &QuorumVolume{}, &QuorumVolumeList{})
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
