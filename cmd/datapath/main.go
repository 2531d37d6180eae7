// Command datapath is quorum-csi's long-lived process on every node: the
// replica agent (package agent: the node's replica images, served over
// NBD) and the data path (package datapath: the staged volumes' engines
// and block devices). It lives apart from the CSI node plugin (cmd/node),
// which asks it over a Unix socket to stage and unstage, so restarting
// or upgrading the plugin never touches a device.
//
// Only one runs per node at a time (a lock in the state folder). A new
// one that finds another running asks it to hand over (the planned
// upgrade: the old one answers what is in flight and lets go), then takes
// every recorded volume back. One that starts after a crash takes them
// back from the records alone. On SIGTERM it lets go of the devices
// without removing them, for the next one to take back. A handover is
// final for the pod that made it: the old process idles until its pod
// goes, and a restart of its container waits too (the state folder
// names the instance that handed over) rather than take the node back
// from its successor.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"

	"golang.org/x/sys/unix"

	"github.com/quorum-csi/quorum-csi/internal/atomicfile"
	"github.com/quorum-csi/quorum-csi/internal/daemon"
	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/datapath"
	"github.com/quorum-csi/quorum-csi/pkg/metrics"
	"github.com/quorum-csi/quorum-csi/pkg/nbd"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

type options struct {
	agent        agent.Config
	dp           datapath.Config
	socket       string
	tlsDir       string
	kubeconfig   string
	handoverWait time.Duration
	instance     string
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := daemon.NewFlagSet("datapath", stderr, &o.agent.Node, &o.kubeconfig)
	fs.StringVar(&o.agent.Namespace, "namespace", agent.DefaultNamespace, "namespace of the node's Lease (the driver's namespace)")
	fs.StringVar(&o.agent.DataDir, "data-dir", "/var/lib/quorum-csi/replicas", "folder holding the replica images, DIR/<volume>/<replica>.img")
	fs.StringVar(&o.agent.Listen, "listen", ":"+nbd.DefaultPort, "address of the NBD server that serves the replicas, HOST:PORT")
	fs.StringVar(&o.agent.AdvertiseAddress, "advertise-address", "", "host other nodes dial to reach the NBD server, usually the node IP; reported in status.replicas[].endpoint with the listen port (default: the --listen host)")
	fs.StringVar(&o.tlsDir, "tls-dir", "", "folder with ca-cert.pem, server-cert.pem and server-key.pem (the NBD server then requires TLS with client certificates from that CA) and client-cert.pem, client-key.pem (for the staged volumes' replicas)")
	fs.StringVar(&o.agent.MetricsAddress, "metrics-address", ":9809", "address of the Prometheus endpoint /metrics (the agent's and the staged volumes'); 0 turns it off")
	fs.DurationVar(&o.agent.LeaseDuration, "lease-duration", agent.DefaultLeaseDuration, "the node Lease's duration: the controller gives up on the node this long after the last renewal")
	fs.DurationVar(&o.agent.RenewInterval, "renew-interval", agent.DefaultRenewInterval, "how often the node Lease is renewed")
	fs.DurationVar(&o.agent.ShutdownTimeout, "shutdown-timeout", agent.DefaultShutdownTimeout, "on SIGTERM or a handover, how long requests in flight may take to finish")
	fs.StringVar(&o.agent.LocalSocket, "local-socket", "/run/quorum-csi/nbd.sock", "Unix socket the NBD server also listens on; staged volumes reach this node's replicas through it")
	fs.StringVar(&o.socket, "socket", datapath.DefaultSocket, "Unix socket of the data path's API, which the CSI node plugin calls")
	fs.StringVar(&o.dp.HolderSocket, "holder-socket", "", "the FUSE descriptor holder (quorumctl fuse-holder) this process puts its FUSE+loop devices' connections into, so that they outlive it; empty: one in --state-dir, started if none runs")
	fs.StringVar(&o.dp.StateDir, "state-dir", "/run/quorum-csi/state", "folder of the staged volumes' records, device state, FUSE descriptor holders' sockets and the lock that keeps one data path per node")
	fs.StringVar(&o.dp.Frontend, "frontend", "auto", "how staged volumes become block devices: ublk (/dev/ublkbN; Linux 6.4+ with ublk_drv), fuse-loop (/dev/loopN over a private FUSE file), or auto (ublk when /dev/ublk-control exists on Linux 6.4+, else fuse-loop)")
	fs.DurationVar(&o.dp.RequestTimeout, "nbd-timeout", 10*time.Second, "how long a request to a replica server may take, waiting for a reconnect included, before that replica is left out (it resyncs when it answers again); a server that restarts within it costs no replica")
	fs.DurationVar(&o.dp.ProbeInterval, "probe-interval", 2*time.Second, "how often faulty replicas are asked whether they answer again")
	fs.Int64Var(&o.dp.ScrubRate, "scrub-rate", 4<<20, "bytes per second of the background scrub of each staged volume, which votes across replicas and repairs minorities (0: none)")
	fs.DurationVar(&o.dp.ScrubInterval, "scrub-interval", 24*time.Hour, "time between background scrub passes of a staged volume; the first starts at stage")
	fs.DurationVar(&o.handoverWait, "handover-timeout", time.Minute, "how long a data path that starts beside a running one waits for it to hand over")
	fs.StringVar(&o.instance, "instance", os.Getenv("POD_UID"), "names this process in its ready answer, so that the readiness probe (datapath probe --instance) does not take the answer of the predecessor it replaces for its own (default $POD_UID)")
	if err := daemon.ParseFlags(fs, args); err != nil {
		return o, err
	}
	if o.tlsDir == "" {
		return o, errors.New("--tls-dir is required: replicas are reached over TLS, the local one too")
	}
	if o.dp.ScrubRate < 0 {
		return o, fmt.Errorf("--scrub-rate %d: want 0 (off) or a positive rate", o.dp.ScrubRate)
	}
	if o.dp.ProbeInterval <= 0 || o.dp.RequestTimeout <= 0 || o.dp.ScrubInterval <= 0 || o.handoverWait <= 0 {
		return o, errors.New("--probe-interval, --nbd-timeout, --scrub-interval and --handover-timeout must be positive")
	}
	return o, nil
}

func run(args []string, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "probe" {
		return probe(args[1:], stderr)
	}
	o, err := parseFlags(args, stderr)
	log, exit, ok := daemon.Start("datapath", err, stderr)
	if !ok {
		return exit
	}
	if err := serve(o, log); err != nil {
		log.Error(err, "data path failed")
		return 1
	}
	return 0
}

func serve(o options, log logr.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var err error
	if o.agent.TLS, err = nbd.ServerTLSDir(o.tlsDir); err != nil {
		return fmt.Errorf("load TLS files: %w", err)
	}
	rc, err := daemon.RESTConfig(o.kubeconfig)
	if err != nil {
		return fmt.Errorf("API server configuration: %w", err)
	}
	c, err := contract.NewClient(rc)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(o.dp.StateDir, 0o700); err != nil {
		return fmt.Errorf("state folder: %w", err)
	}
	if handedOver(o) {
		// A restart of this pod's container after it handed the node
		// over: taking the node back would take it from the successor,
		// whose restart would take it back again, for as long as both
		// pods live. The pod is on its way out; wait for that.
		log.Info("this pod handed the node over to a successor; waiting to be removed", "instance", o.instance)
		<-ctx.Done()
		return nil
	}
	lock, err := takeNode(ctx, o, log)
	if err != nil {
		return err
	}
	defer lock.Close()

	events := agent.NewVolumeEvents(c, o.agent.Node)
	o.dp.OnEvent = func(id string, e quorum.Event) { events.Engine(id, e) }
	volumeMetrics := prometheus.NewRegistry()
	if o.dp.Metrics, err = metrics.NewSet(volumeMetrics); err != nil {
		return fmt.Errorf("volume metrics: %w", err)
	}
	o.agent.ExtraMetrics = volumeMetrics
	o.agent.Logger = log
	o.dp.Logger = slog.New(logr.ToSlogHandler(log.WithName("datapath")))
	svc, err := datapath.New(o.dp)
	if err != nil {
		return err
	}

	// The agent serves this node's replicas, the staged volumes' local
	// ones among them: it runs first, and the volumes are taken back as
	// soon as it serves the replicas on disk (before it has reached the
	// API server; TakeOver still retries for the other nodes' replicas).
	agentCtx, stopAgent := context.WithCancel(ctx)
	defer stopAgent()
	agentDone := make(chan error, 1)
	serving := make(chan struct{})
	o.agent.Serving = func() { close(serving) }
	go func() { agentDone <- agent.Run(agentCtx, rc, o.agent) }()

	// letGo ends this process's service, once: for a successor that
	// asked (handover), on SIGTERM, or when the agent failed.
	var letGoOnce sync.Once
	var letGoErr error
	letGo := func(why string) error {
		letGoOnce.Do(func() {
			log.Info("letting go of the devices for the next data path", "why", why)
			start := time.Now()
			hctx, cancel := context.WithTimeout(context.Background(), o.agent.ShutdownTimeout)
			defer cancel()
			letGoErr = svc.Handover(hctx)
			stopAgent()
			letGoErr = errors.Join(letGoErr, <-agentDone)
			lock.Close()
			log.Info("let go of the node", "took", time.Since(start).String(), "error", letGoErr)
		})
		return letGoErr
	}
	handedOver := make(chan struct{})
	var handingOver atomic.Bool
	api := &datapath.Server{Service: svc, Instance: o.instance, Handover: func(context.Context) error {
		handingOver.Store(true)
		err := letGo("a successor asked for the node")
		if merr := markHandedOver(o); merr != nil {
			log.Error(merr, "record the handover (a restart of this container would ask the successor for the node back)")
		}
		close(handedOver)
		return err
	}}
	l, err := datapath.Listen(o.socket)
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: api.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(l)
	defer hs.Close()

	start := time.Now()
	select {
	case <-serving:
	case err := <-agentDone:
		agentDone <- err // for letGo
		return errors.Join(fmt.Errorf("node agent stopped before it served: %w", err), letGo("the node agent stopped"))
	}
	svc.TakeOver(ctx)
	if !handingOver.Load() {
		log.Info("data path ready", "volumes", len(svc.List()), "took", time.Since(start).String(), "frontend", svc.Frontend(), "socket", o.socket)
	}

	select {
	case <-handedOver:
	case err := <-agentDone:
		agentDone <- err // for letGo
		if !handingOver.Load() {
			// The replicas are not served any more (the kubelet restarts us).
			return errors.Join(fmt.Errorf("node agent stopped: %w", err), letGo("the node agent stopped"))
		}
		// Stopped by the handover, which is not done yet.
		<-handedOver
	case <-ctx.Done():
		return letGo("signal")
	}
	// Handed over. Idle until the pod goes: exiting now would only have
	// the kubelet restart us beside the successor.
	<-ctx.Done()
	return nil
}

// handedOverFile, in the state folder, names the instance that last
// handed the node over to a successor.
const handedOverFile = "handed-over"

func markHandedOver(o options) error {
	if o.instance == "" {
		return nil
	}
	return atomicfile.WriteFile(filepath.Join(o.dp.StateDir, handedOverFile), []byte(o.instance+"\n"), 0o600)
}

// handedOver reports whether this instance (its pod) handed the node
// over already.
func handedOver(o options) bool {
	b, err := os.ReadFile(filepath.Join(o.dp.StateDir, handedOverFile))
	return err == nil && o.instance != "" && strings.TrimSpace(string(b)) == o.instance
}

// probe is the readiness probe: exit 0 once the data path at --socket
// took back every volume staged before it started, else 1 with why.
func probe(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("datapath probe", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", datapath.DefaultSocket, "the data path's API socket")
	timeout := fs.Duration("timeout", 2*time.Second, "how long to wait for an answer")
	instance := fs.String("instance", os.Getenv("POD_UID"), "the data path instance that must answer (its --instance; default $POD_UID): an answer from another one, a predecessor still on the socket, is not ready; empty: any")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	got, err := datapath.NewClient(*socket).ReadyInstance(ctx)
	if err == nil && *instance != "" && got != *instance {
		err = fmt.Errorf("instance %q answered, not this one (%q): the predecessor has not handed over yet", got, *instance)
	}
	if err != nil {
		fmt.Fprintln(stderr, "datapath probe:", err)
		return 1
	}
	return 0
}

// nodeLock is the flock that keeps one data path per node.
type nodeLock struct{ f *os.File }

func (l *nodeLock) Close() {
	if l.f != nil {
		l.f.Close()
		l.f = nil
	}
}

// takeNode takes the node's data path lock. If another data path holds
// it, that one is asked to hand over, and the lock is taken once it let
// go.
func takeNode(ctx context.Context, o options, log logr.Logger) (*nodeLock, error) {
	path := filepath.Join(o.dp.StateDir, "datapath.lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("node lock: %w", err)
	}
	lockNB := func() error { return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) }
	err = lockNB()
	if err == nil {
		return &nodeLock{f: f}, nil
	}
	if !errors.Is(err, unix.EWOULDBLOCK) {
		f.Close()
		return nil, fmt.Errorf("node lock %s: %w", path, err)
	}
	log.Info("another data path serves this node: asking it to hand over", "socket", o.socket)
	hctx, cancel := context.WithTimeout(ctx, o.handoverWait)
	defer cancel()
	if err := datapath.NewClient(o.socket).Handover(hctx); err != nil {
		// It may be letting go anyway (stopping); wait for the lock.
		log.Error(err, "handover request failed; waiting for the running data path to let go")
	}
	for {
		if err := lockNB(); err == nil {
			return &nodeLock{f: f}, nil
		} else if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("node lock %s: %w", path, err)
		}
		select {
		case <-hctx.Done():
			f.Close()
			return nil, fmt.Errorf("the running data path did not let go of the node within %s", o.handoverWait)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
