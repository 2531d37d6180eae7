// Command node is quorum-csi's node plugin, run on every node by a
// DaemonSet. For now it runs the replica agent (package agent): it
// creates, serves over NBD and deletes the replica images the controller
// places on the node, and reports them in the QuorumVolume status.
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

	"github.com/go-logr/logr"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/nbd"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// options are the command line: the agent's Config and how to reach the
// API server.
type options struct {
	agent      agent.Config
	tlsDir     string
	kubeconfig string
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
	if err := agent.Run(ctx, rc, o.agent); err != nil {
		log.Error(err, "node agent failed")
		return 1
	}
	return 0
}
