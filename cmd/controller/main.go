// Command controller runs the quorum-csi QuorumVolume controller: replica
// placement, replica health from the nodes, phase and conditions, and
// the finalizer (package controller); the CSI Identity and Controller
// services (package csi) for the sidecars beside it; and, with
// --resizer, the PVC resizer (controller.Resizer), which does external-resizer's
// part of PVC expansion. It is wiring only.
//
// Flags:
//
//	--csi-endpoint URL                CSI gRPC endpoint (default unix:///csi/csi.sock)
//	--namespace NS                    driver namespace, where the node agents' Leases live (default quorum-csi)
//	--metrics-bind-address ADDR       Prometheus endpoint, /metrics (default :8080; "0" disables it)
//	--health-probe-bind-address ADDR  /healthz and /readyz (default :8081; "0" disables them)
//	--leader-elect                    run one active controller per cluster through a Lease in --namespace (default true)
//	--workers N                       QuorumVolumes reconciled at once (default 8, controller.DefaultWorkers)
//	--resizer                         expand PVCs of this driver whose storage request grows, as external-resizer would (default false;
//	                                  leave it off when an external-resizer sidecar runs)
//	--kubeconfig PATH                 a kubeconfig file; in a pod the service account is used
//	--zap-log-level, --zap-encoder, --zap-devel, ...  logging (structured JSON by default)
package main

import (
	"flag"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/controller"
	"github.com/quorum-csi/quorum-csi/pkg/csi"
)

func main() {
	var (
		namespace   = flag.String("namespace", contract.DefaultNamespace, "driver namespace, where the node agents' Leases live")
		metricsAddr = flag.String("metrics-bind-address", ":8080", `address of the Prometheus endpoint; "0" disables it`)
		probeAddr   = flag.String("health-probe-bind-address", ":8081", `address of /healthz and /readyz; "0" disables them`)
		leaderElect = flag.Bool("leader-elect", true, "elect one active controller through a Lease in --namespace")
		workers     = flag.Int("workers", controller.DefaultWorkers, "QuorumVolumes reconciled at once")
		csiEndpoint = flag.String("csi-endpoint", "unix:///csi/csi.sock", "CSI gRPC endpoint the sidecars call: unix:///path or tcp://host:port")
		resizer     = flag.Bool("resizer", false, "expand PVCs of this driver whose storage request grows, as the external-resizer sidecar would "+
			"(on the leader only); leave it off when an external-resizer runs")
	)
	logOpts := zap.Options{}
	logOpts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&logOpts)))

	if *workers < 1 {
		fmt.Fprintf(os.Stderr, "controller: --workers %d: want at least 1\n", *workers)
		os.Exit(2)
	}
	if err := run(*namespace, *metricsAddr, *probeAddr, *csiEndpoint, *leaderElect, *resizer, *workers); err != nil {
		fmt.Fprintln(os.Stderr, "controller:", err)
		os.Exit(1)
	}
}

func run(namespace, metricsAddr, probeAddr, csiEndpoint string, leaderElect, resizer bool, workers int) error {
	ctx := ctrl.SetupSignalHandler()
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, v1alpha1.AddToScheme} {
		if err := add(scheme); err != nil {
			return fmt.Errorf("build scheme: %w", err)
		}
	}
	cfg, err := ctrl.GetConfig()
	if err != nil {
		return fmt.Errorf("find the API server: %w", err)
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  scheme,
		Metrics:                 metricsserver.Options{BindAddress: metricsAddr},
		HealthProbeBindAddress:  probeAddr,
		LeaderElection:          leaderElect,
		LeaderElectionID:        "quorum-controller",
		LeaderElectionNamespace: namespace,
		Cache:                   controller.CacheOptions(namespace),
	})
	if err != nil {
		return fmt.Errorf("create manager: %w", err)
	}
	r, err := controller.New(mgr.GetClient(), mgr.GetEventRecorder(controller.FieldManager), controller.Options{Namespace: namespace, Workers: workers})
	if err != nil {
		return err
	}
	if err := r.SetupWithManager(mgr); err != nil {
		return err
	}
	// The CSI services read and write through a client without the
	// manager's cache (csi.NewController says why), and serve on every
	// replica, leader or not (csi.Server.NeedLeaderElection).
	direct, err := client.New(cfg, client.Options{Scheme: scheme, Mapper: mgr.GetRESTMapper()})
	if err != nil {
		return fmt.Errorf("create CSI client: %w", err)
	}
	csiController := csi.NewController(direct)
	err = mgr.Add(&csi.Server{
		Endpoint:   csiEndpoint,
		Identity:   csi.NewIdentity(csi.APIProber{Client: direct}),
		Controller: csiController,
		Log:        ctrl.Log.WithName("csi"),
	})
	if err != nil {
		return fmt.Errorf("add CSI server: %w", err)
	}
	// The resizer expands through the same Controller, so its calls and
	// the sidecars' share the per-volume lock.
	if resizer {
		r := controller.NewResizer(mgr.GetClient(), csiController, mgr.GetEventRecorder(controller.ResizerName))
		if err := r.SetupWithManager(ctx, mgr); err != nil {
			return err
		}
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return fmt.Errorf("add health check: %w", err)
	}
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		return fmt.Errorf("add ready check: %w", err)
	}
	if err := mgr.Start(ctx); err != nil {
		return fmt.Errorf("run manager: %w", err)
	}
	return nil
}
