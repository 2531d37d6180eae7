// Command node is quorum-csi's CSI node plugin, run on every node by a
// DaemonSet: the CSI Node and Identity services (package csi) and the
// kubelet registration. It holds no volume: it asks the node's data path
// (cmd/datapath, a process of its own) to serve each staged volume as a
// block device and mounts that, so restarting or upgrading the plugin
// never touches a device. It also watches the data path and shows in the
// API when it stops serving a volume (agent.DataPathWatcher).
package main

import (
	"context"
	"errors"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/quorum-csi/quorum-csi/internal/daemon"
	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/csi"
	"github.com/quorum-csi/quorum-csi/pkg/datapath"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// options are the command line.
type options struct {
	csi         csi.NodeConfig
	socket      string
	csiEndpoint string
	kubeletDir  string
	regPath     string
	kubeconfig  string
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := daemon.NewFlagSet("node", stderr, &o.csi.NodeName, &o.kubeconfig)
	fs.StringVar(&o.csi.TLSDir, "tls-dir", "", "folder with the NBD client certificates (ca-cert.pem, client-cert.pem, client-key.pem), at the same path in the data path's container")
	fs.StringVar(&o.csi.TLSHostname, "tls-hostname", "localhost", "a name in the replica servers' certificate, checked on the local socket")
	fs.StringVar(&o.csi.LocalSocket, "local-socket", "/run/quorum-csi/nbd.sock", "the node agent's Unix socket (datapath --local-socket), through which staged volumes reach this node's replicas")
	fs.StringVar(&o.socket, "datapath-socket", datapath.DefaultSocket, "the node's data path API socket (datapath --socket)")
	fs.StringVar(&o.csiEndpoint, "csi-endpoint", "unix:///csi/csi.sock", "where the CSI Node and Identity services listen, unix:///path")
	fs.StringVar(&o.kubeletDir, "kubelet-dir", "/var/lib/kubelet", "the kubelet's folder: the plugin registers with the kubelet through DIR/plugins_registry/quorum.csi.dev-reg.sock; empty: no registration")
	fs.StringVar(&o.regPath, "kubelet-registration-path", "", "the CSI socket's path on the host, as the kubelet dials it (default: the --csi-endpoint path, when the container sees it at the same path)")
	if err := daemon.ParseFlags(fs, args); err != nil {
		return o, err
	}
	switch {
	case o.csi.TLSDir == "":
		// Replicas are only reached over TLS, the local one too.
		return o, errors.New("--tls-dir is required")
	case o.csiEndpoint == "":
		return o, errors.New("--csi-endpoint is required")
	}
	return o, nil
}

func run(args []string, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	log, exit, ok := daemon.Start("node", err, stderr)
	if !ok {
		return exit
	}
	rc, err := daemon.RESTConfig(o.kubeconfig)
	if err != nil {
		log.Error(err, "API server configuration")
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// Uncached: NodeStageVolume needs the replicas' current endpoints.
	// The client also writes the attachments' DataPathReady condition,
	// the engines' views of the replicas, and Events.
	c, err := contract.NewClient(rc)
	if err != nil {
		log.Error(err, "CSI node service")
		return 1
	}
	dp := datapath.NewClient(o.socket)
	o.csi.Client, o.csi.DataPath = c, dp
	node, err := csi.NewNode(o.csi)
	if err != nil {
		log.Error(err, "CSI node service")
		return 1
	}
	prober := csi.NodeProber{API: csi.APIProber{Client: c}, DataPath: dp}
	srv := &csi.Server{Endpoint: o.csiEndpoint, Identity: csi.NewIdentity(prober), Node: node, Log: log.WithName("csi")}
	watcher := &agent.DataPathWatcher{
		Client: c, Node: o.csi.NodeName, DataPath: dp,
		Events: agent.NewVolumeEvents(c, o.csi.NodeName), Log: log.WithName("datapath-watch"),
	}
	// The CSI services, the kubelet registration and the watcher live
	// and die together.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	runs := []func(context.Context) error{srv.Start, watcher.Run}
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
	return code
}
