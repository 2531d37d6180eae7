package kubetest

import (
	"context"
	"flag"
	"io"
	"log/slog"
	"net"
	"os"
	"testing"

	"github.com/go-logr/logr"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

// Main runs a test binary's tests with controller-runtime's global logger
// set, which otherwise complains that none was: its logs go to stderr
// with -v and nowhere without. Call it from TestMain.
func Main(m *testing.M) {
	flag.Parse()
	var w io.Writer = io.Discard
	if testing.Verbose() {
		w = os.Stderr
	}
	log.SetLogger(zap.New(zap.UseDevMode(true), zap.WriteTo(w)))
	os.Exit(m.Run())
}

// Logger sends a component's logs to the test log (shown on failure or
// with -v), each line tagged key=name.
func Logger(t testing.TB, key, name string) logr.Logger {
	return logr.FromSlogHandler(Slog(t).Handler()).WithValues(key, name)
}

// Slog is a slog.Logger writing text lines, Info and above, to the test
// log.
func Slog(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testutil.LogWriter(t), &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// FreeAddr is a free TCP address (ip:port) on ip.
func FreeAddr(t testing.TB, ip string) string {
	t.Helper()
	l, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// RunManager makes a controller-runtime manager for s with opts, lets
// setup add its reconcilers and runnables, and runs it until the test
// ends. The metrics and health endpoints are off unless opts sets them,
// and controller names need not be unique (every test starts its own).
func (s *Server) RunManager(t testing.TB, opts ctrl.Options, setup func(ctrl.Manager) error) ctrl.Manager {
	t.Helper()
	if opts.Metrics.BindAddress == "" {
		opts.Metrics = metricsserver.Options{BindAddress: "0"}
	}
	if opts.HealthProbeBindAddress == "" {
		opts.HealthProbeBindAddress = "0"
	}
	if opts.Controller.SkipNameValidation == nil {
		opts.Controller = config.Controller{SkipNameValidation: ptr.To(true)}
	}
	mgr, err := ctrl.NewManager(s.Config, opts)
	if err != nil {
		t.Fatalf("manager: %v", err)
	}
	if err := setup(mgr); err != nil {
		t.Fatalf("manager: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	// Registered after Start's cleanup, so it runs before the API
	// server stops.
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	})
	return mgr
}
