// Command node is quorum-csi's node plugin, run on every node by a
// DaemonSet. It runs the replica agent (package agent), which creates,
// serves over NBD and deletes the replica images the controller places
// on the node, and beside it the CSI Node and Identity services (package
// csi), which assemble published volumes from their replicas, the local
// one through the agent's Unix socket.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	eventsv1 "k8s.io/api/events/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/csi"
	"github.com/quorum-csi/quorum-csi/pkg/metrics"
	"github.com/quorum-csi/quorum-csi/pkg/nbd"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// options are the command line: the agent's Config and how to reach the
// API server.
type options struct {
	agent       agent.Config
	csi         csi.NodeConfig
	csiEndpoint string
	kubeletDir  string
	regPath     string
	tlsDir      string
	kubeconfig  string
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("node", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.agent.Node, "node-name", os.Getenv("NODE_NAME"), "this node's name, as its Node object (default $NODE_NAME, set from the downward API)")
	fs.StringVar(&o.agent.Namespace, "namespace", agent.DefaultNamespace, "namespace of the node's Lease (the driver's namespace)")
	fs.StringVar(&o.agent.DataDir, "data-dir", "/var/lib/quorum-csi/replicas", "folder holding the replica images, DIR/<volume>/<replica>.img")
	fs.StringVar(&o.agent.Listen, "listen", ":"+nbd.DefaultPort, "address of the NBD server that serves the replicas, HOST:PORT")
	fs.StringVar(&o.agent.AdvertiseAddress, "advertise-address", "", "host other nodes dial to reach the NBD server, usually the node IP; reported in status.replicas[].endpoint with the listen port (default: the --listen host)")
	fs.StringVar(&o.tlsDir, "tls-dir", "", "folder with ca-cert.pem, server-cert.pem and server-key.pem: the NBD server then requires TLS with client certificates from that CA")
	fs.StringVar(&o.agent.MetricsAddress, "metrics-address", ":9809", "address of the Prometheus endpoint /metrics; 0 turns it off")
	fs.DurationVar(&o.agent.LeaseDuration, "lease-duration", agent.DefaultLeaseDuration, "the node Lease's duration: the controller gives up on the node this long after the last renewal")
	fs.DurationVar(&o.agent.RenewInterval, "renew-interval", agent.DefaultRenewInterval, "how often the node Lease is renewed")
	fs.DurationVar(&o.agent.ShutdownTimeout, "shutdown-timeout", agent.DefaultShutdownTimeout, "on SIGTERM, how long NBD requests in flight may take to finish")
	fs.StringVar(&o.agent.LocalSocket, "local-socket", "/run/quorum-csi/nbd.sock", "Unix socket the NBD server also listens on; the CSI Node service reaches this node's replicas through it")
	fs.StringVar(&o.csiEndpoint, "csi-endpoint", "unix:///csi/csi.sock", "where the CSI Node and Identity services listen, unix:///path; empty: no CSI services")
	fs.StringVar(&o.kubeletDir, "kubelet-dir", "/var/lib/kubelet", "the kubelet's folder: the plugin registers with the kubelet through DIR/plugins_registry/quorum.csi.dev-reg.sock; empty: no registration")
	fs.StringVar(&o.regPath, "kubelet-registration-path", "", "the CSI socket's path on the host, as the kubelet dials it (default: the --csi-endpoint path, when the container sees it at the same path)")
	fs.StringVar(&o.csi.TLSHostname, "tls-hostname", "localhost", "a name in the server certificate of --tls-dir, checked on the local socket")
	fs.StringVar(&o.csi.StateDir, "state-dir", "/run/quorum-csi/state", "folder for staged volumes' FUSE mount points and ublk state, DIR/<volume>")
	fs.StringVar(&o.csi.Frontend, "frontend", csi.FrontendAuto, "how staged volumes become block devices: ublk, fuse-loop, or auto (ublk when /dev/ublk-control exists)")
	fs.DurationVar(&o.csi.RequestTimeout, "nbd-timeout", 10*time.Second, "how long a request to a replica server may take, waiting for a reconnect included, before that replica is left out (it resyncs when it answers again); a server that restarts within it costs no replica")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig file; default: in-cluster config, or $KUBECONFIG")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.agent.Node == "" {
		return o, errors.New("no node name: give --node-name or set NODE_NAME")
	}
	if o.csiEndpoint != "" && (o.tlsDir == "" || o.agent.LocalSocket == "") {
		// Replicas are only reached over TLS, the local one too.
		return o, errors.New("the CSI services need --tls-dir and --local-socket (or give --csi-endpoint= to run the agent alone)")
	}
	o.csi.NodeName, o.csi.TLSDir, o.csi.LocalSocket = o.agent.Node, o.tlsDir, o.agent.LocalSocket
	return o, nil
}

func run(args []string, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "node:", err)
		return 2
	}
	log := logr.FromSlogHandler(slog.NewJSONHandler(stderr, nil))
	ctrl.SetLogger(log)
	o.agent.Logger = log
	if o.tlsDir != "" {
		if o.agent.TLS, err = nbd.ServerTLSDir(o.tlsDir); err != nil {
			log.Error(err, "load TLS files")
			return 1
		}
	}
	var rc *rest.Config
	if o.kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", o.kubeconfig)
	} else {
		rc, err = ctrl.GetConfig()
	}
	if err != nil {
		log.Error(err, "API server configuration")
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if o.csiEndpoint == "" {
		if err := agent.Run(ctx, rc, o.agent); err != nil {
			log.Error(err, "node agent failed")
			return 1
		}
		return 0
	}
	c, err := newClient(rc)
	if err != nil {
		log.Error(err, "CSI node service")
		return 1
	}
	o.csi.Client, o.csi.Events = c, c
	// The staged volumes' metrics are served with the agent's.
	volumeMetrics := prometheus.NewRegistry()
	if o.csi.Metrics, err = metrics.NewSet(volumeMetrics); err != nil {
		log.Error(err, "volume metrics")
		return 1
	}
	o.agent.ExtraMetrics = volumeMetrics
	o.csi.Logger = slog.New(logr.ToSlogHandler(log.WithName("volume")))
	node, err := csi.NewNode(o.csi)
	if err != nil {
		log.Error(err, "CSI node service")
		return 1
	}
	srv := &csi.Server{Endpoint: o.csiEndpoint, Identity: csi.NewIdentity(csi.APIProber{Client: o.csi.Client}), Node: node, Log: log.WithName("csi")}
	// The agent, the CSI services and the kubelet registration live and
	// die together: none is of use without the others.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	runs := []func(context.Context) error{
		func(ctx context.Context) error { return agent.Run(ctx, rc, o.agent) },
		srv.Start,
	}
	if o.kubeletDir != "" {
		reg := &csi.Registration{KubeletDir: o.kubeletDir, CSIEndpoint: o.csiEndpoint, Log: log.WithName("registration")}
		if o.regPath != "" {
			reg.CSIEndpoint = "unix://" + o.regPath
		}
		runs = append(runs, reg.Start)
	}
	errs := make(chan error, len(runs))
	for _, run := range runs {
		go func() { errs <- run(ctx); cancel() }()
	}
	code := 0
	for range runs {
		if err := <-errs; err != nil {
			log.Error(err, "node plugin failed")
			code = 1
		}
	}
	// Volumes still staged are torn down before the process goes: a FUSE
	// device would not outlive it anyway.
	if err := node.Close(); err != nil {
		log.Error(err, "detach staged volumes")
		code = 1
	}
	return code
}

// newClient reads QuorumVolumes from the API server, not through a
// cache (NodeStageVolume needs the replicas' current endpoints), and
// writes the engine's Events.
func newClient(rc *rest.Config) (client.Client, error) {
	scheme := kruntime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("scheme: %w", err)
	}
	if err := eventsv1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("scheme: %w", err)
	}
	c, err := client.New(rc, client.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("API client: %w", err)
	}
	return c, nil
}
