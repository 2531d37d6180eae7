package csi

import (
	"context"
	"fmt"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// DriverName is the CSI driver name, as in the CSIDriver object and the
// StorageClasses' provisioner.
const DriverName = contract.DriverName

// Version is the driver's vendor version, set at build time with
// -ldflags "-X github.com/quorum-csi/quorum-csi/pkg/csi.Version=...".
var Version = "dev"

// Prober says whether the plugin can serve calls; a non-nil error says
// what it is missing.
type Prober interface {
	Probe(ctx context.Context) error
}

// Identity is the CSI Identity service. The controller and the node
// binaries each serve one, with their own Prober.
type Identity struct {
	csipb.UnimplementedIdentityServer
	prober Prober
}

// NewIdentity returns the Identity service; Probe asks prober.
func NewIdentity(prober Prober) *Identity {
	return &Identity{prober: prober}
}

func (*Identity) GetPluginInfo(context.Context, *csipb.GetPluginInfoRequest) (*csipb.GetPluginInfoResponse, error) {
	return &csipb.GetPluginInfoResponse{Name: DriverName, VendorVersion: Version}, nil
}

// GetPluginCapabilities: the controller service; topology, because a
// WaitForFirstConsumer volume puts a replica on the consumer's node
// (though any node can reach the volume); and offline expansion: the
// agents grow the replicas at once, but the engine cannot grow a staged
// volume, so the new size reaches the pod when the volume is staged
// again (claiming online expansion would promise more).
func (*Identity) GetPluginCapabilities(context.Context, *csipb.GetPluginCapabilitiesRequest) (*csipb.GetPluginCapabilitiesResponse, error) {
	service := func(t csipb.PluginCapability_Service_Type) *csipb.PluginCapability {
		return &csipb.PluginCapability{Type: &csipb.PluginCapability_Service_{Service: &csipb.PluginCapability_Service{Type: t}}}
	}
	return &csipb.GetPluginCapabilitiesResponse{Capabilities: []*csipb.PluginCapability{
		service(csipb.PluginCapability_Service_CONTROLLER_SERVICE),
		service(csipb.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS),
		{Type: &csipb.PluginCapability_VolumeExpansion_{VolumeExpansion: &csipb.PluginCapability_VolumeExpansion{
			Type: csipb.PluginCapability_VolumeExpansion_OFFLINE,
		}}},
	}}, nil
}

// Probe answers ready when the Prober finds nothing missing; otherwise
// the call fails with the Prober's error (APIProber's is
// FAILED_PRECONDITION whatever the cause, which the message names), which
// the livenessprobe sidecar logs.
func (s *Identity) Probe(ctx context.Context, _ *csipb.ProbeRequest) (*csipb.ProbeResponse, error) {
	if err := s.prober.Probe(ctx); err != nil {
		return nil, err
	}
	return &csipb.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}

// APIProber is the Prober of both binaries: ready when the API server answers
// and serves QuorumVolumes (the CRD is installed and established).
type APIProber struct {
	Client client.Reader
}

// Probe lists at most one QuorumVolume.
func (p APIProber) Probe(ctx context.Context) error {
	if err := p.Client.List(ctx, &v1alpha1.QuorumVolumeList{}, client.Limit(1)); err != nil {
		return fmt.Errorf("%w: list QuorumVolumes from the API server: %w", errFailedPrecondition, err)
	}
	return nil
}

// NodeProber is the node plugin's Prober: ready when the API server
// serves QuorumVolumes and the node's data path has taken back every
// volume staged before it (re)started, so the plugin reports ready only
// once the node serves what it served before.
type NodeProber struct {
	API      APIProber
	DataPath interface{ Ready(context.Context) error }
}

// Probe asks the API server, then the data path.
func (p NodeProber) Probe(ctx context.Context) error {
	if err := p.API.Probe(ctx); err != nil {
		return err
	}
	if err := p.DataPath.Ready(ctx); err != nil {
		return fmt.Errorf("%w: %w", errFailedPrecondition, err)
	}
	return nil
}
