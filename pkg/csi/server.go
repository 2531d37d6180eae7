package csi

import (
	"context"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// shutdownTimeout bounds how long Start waits for calls in flight when
// its context ends; calls still running then are cut off, and the CO
// retries them against the next instance.
const shutdownTimeout = 10 * time.Second

// Server serves CSI services on one endpoint. Nil services are not
// registered: the controller binary serves Identity and Controller, the
// node binary Identity and Node.
type Server struct {
	// Endpoint is unix:///path/to/csi.sock (what the sidecars use) or
	// tcp://host:port.
	Endpoint   string
	Identity   csipb.IdentityServer
	Controller csipb.ControllerServer
	Node       csipb.NodeServer
	Log        logr.Logger
}

// NeedLeaderElection is false: the sidecars beside every controller
// replica elect their own leader and call the plugin next to them, so
// every replica must answer (controller-runtime's LeaderElectionRunnable).
func (s *Server) NeedLeaderElection() bool { return false }

// Start serves until ctx ends, then stops gracefully within
// shutdownTimeout. It fails when the endpoint cannot be listened on.
// It is a controller-runtime Runnable.
func (s *Server) Start(ctx context.Context) error {
	l, err := listen(s.Endpoint)
	if err != nil {
		return err
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(s.intercept))
	if s.Identity != nil {
		csipb.RegisterIdentityServer(srv, s.Identity)
	}
	if s.Controller != nil {
		csipb.RegisterControllerServer(srv, s.Controller)
	}
	if s.Node != nil {
		csipb.RegisterNodeServer(srv, s.Node)
	}
	s.Log.Info("serving CSI", "endpoint", s.Endpoint, "driver", DriverName, "version", Version)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	select {
	case err := <-served:
		return fmt.Errorf("serve CSI on %s: %w", s.Endpoint, err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(shutdownTimeout):
		srv.Stop()
		<-stopped
	}
	<-served
	return nil
}

// listen opens a CSI endpoint. A socket left behind by an earlier run is
// removed first (nothing listens on it any more, or the listen would fail
// anyway); any other file in its place is left alone and is an error.
func listen(endpoint string) (net.Listener, error) {
	scheme, addr, ok := strings.Cut(endpoint, "://")
	if !ok || addr == "" || (scheme != "unix" && scheme != "tcp") {
		return nil, fmt.Errorf("CSI endpoint %q: want unix:///path or tcp://host:port", endpoint)
	}
	if scheme == "unix" {
		if fi, err := os.Lstat(addr); err == nil && fi.Mode().Type() == fs.ModeSocket {
			if err := os.Remove(addr); err != nil {
				return nil, fmt.Errorf("remove stale CSI socket: %w", err)
			}
		}
	}
	l, err := net.Listen(scheme, addr)
	if err != nil {
		return nil, fmt.Errorf("listen on CSI endpoint %s: %w", endpoint, err)
	}
	return l, nil
}

// quietMethods are called every few seconds by the sidecars
// (livenessprobe, capability checks); they are logged at V(4) so the log
// shows the calls that change something. Failures are always logged.
var quietMethods = map[string]bool{
	"/csi.v1.Identity/Probe":                       true,
	"/csi.v1.Identity/GetPluginInfo":               true,
	"/csi.v1.Identity/GetPluginCapabilities":       true,
	"/csi.v1.Controller/ControllerGetCapabilities": true,
	"/csi.v1.Node/NodeGetCapabilities":             true,
}

// intercept turns every handler's error into its gRPC status (toStatus,
// the one place that maps errors to codes) and logs each call with the
// volume it is about and the resulting code. The handler's logger rides
// in the context, so code it calls logs with the call's fields.
func (s *Server) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	log := s.Log.WithValues("method", info.FullMethod)
	if v := volumeOf(req); v != "" {
		log = log.WithValues("volume", v)
	}
	start := time.Now()
	resp, err := handler(logr.NewContext(ctx, log), req)
	err = toStatus(err)
	st := status.Convert(err)
	log = log.WithValues("code", st.Code().String(), "duration", time.Since(start).Round(time.Microsecond).String())
	switch {
	case err != nil:
		log.Info("CSI call failed", "error", st.Message())
	case quietMethods[info.FullMethod]:
		log.V(4).Info("CSI call")
	default:
		log.Info("CSI call")
	}
	return resp, err
}

// volumeOf is the volume a request is about: its volume_id, or the name
// CreateVolume was asked for.
func volumeOf(req any) string {
	switch r := req.(type) {
	case interface{ GetVolumeId() string }:
		return r.GetVolumeId()
	case interface{ GetName() string }:
		return r.GetName()
	}
	return ""
}
