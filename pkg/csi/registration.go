package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// Registration registers the node plugin with the kubelet, the job
// node-driver-registrar does otherwise: the kubelet watches
// <kubelet dir>/plugins_registry for sockets, asks each for its
// PluginInfo, and from then on calls the CSI endpoint it names.
type Registration struct {
	registerapi.UnimplementedRegistrationServer
	// KubeletDir is the kubelet's root folder, usually /var/lib/kubelet.
	KubeletDir string
	// CSIEndpoint is the node plugin's CSI endpoint, unix:///path, as
	// the kubelet reaches it (the same path on the host).
	CSIEndpoint string
	Log         logr.Logger
}

// SocketPath is where the kubelet finds the registration socket.
func (r *Registration) SocketPath() string {
	return filepath.Join(r.KubeletDir, "plugins_registry", DriverName+"-reg.sock")
}

// GetInfo tells the kubelet what the plugin is and where it listens.
func (r *Registration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              DriverName,
		Endpoint:          strings.TrimPrefix(r.CSIEndpoint, "unix://"),
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

// NotifyRegistrationStatus is the kubelet's answer; a refusal is logged
// as an error, since the node then gets no volumes.
func (r *Registration) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if st.GetPluginRegistered() {
		r.Log.Info("registered with the kubelet")
	} else {
		r.Log.Error(errors.New(st.GetError()), "the kubelet refused the registration")
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// Start serves the registration socket until ctx ends, then removes it
// so that the kubelet unregisters the plugin.
func (r *Registration) Start(ctx context.Context) error {
	if !strings.HasPrefix(r.CSIEndpoint, "unix://") {
		return fmt.Errorf("kubelet registration: CSI endpoint %q: the kubelet needs unix:///path", r.CSIEndpoint)
	}
	path := r.SocketPath()
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return fmt.Errorf("kubelet registration: %w", err)
	}
	l, err := listen("unix://" + path)
	if err != nil {
		return fmt.Errorf("kubelet registration: %w", err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, r)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	r.Log.Info("serving kubelet registration", "socket", path)
	select {
	case err := <-served:
		return fmt.Errorf("kubelet registration on %s: %w", path, err)
	case <-ctx.Done():
	}
	// Stop closes the listener, which removes the socket file.
	srv.Stop()
	<-served
	return nil
}
