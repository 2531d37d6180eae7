package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	coordinationv1 "k8s.io/api/coordination/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/nbd"
)

// DefaultShutdownTimeout bounds how long requests in flight may take at
// shutdown (Config.ShutdownTimeout).
const DefaultShutdownTimeout = 30 * time.Second

// Config is one node agent.
type Config struct {
	// Node is the node's name, as in its Node object and in
	// status.replicas[].node.
	Node string
	// Namespace holds the node's Lease (DefaultNamespace when empty).
	Namespace string
	// DataDir holds the replicas: DataDir/<volume>/<replica>.img.
	DataDir string
	// Listen is the NBD server's address, host:port (port 0 picks one).
	Listen string
	// AdvertiseAddress is the host (usually the node IP) that attaching
	// nodes dial; the endpoint reported is it with the listener's port.
	// Empty: the listen address's host, if it names one.
	AdvertiseAddress string
	// LocalSocket, when set, is a Unix socket the same NBD server also
	// listens on. The node's CSI service reaches the local replica
	// through it, so that local writes are epoch-fenced like remote ones
	// and the agent alone holds the images open.
	LocalSocket string
	// TLS, when set, makes the NBD server require mutual TLS
	// (nbd.ServerTLSDir).
	TLS *tls.Config
	// MetricsAddress serves Prometheus metrics at /metrics; "" or "0"
	// turns them off.
	MetricsAddress string
	// ExtraMetrics, if set, are served at /metrics beside the agent's:
	// the data path measures its staged volumes there.
	ExtraMetrics prometheus.Gatherer
	// LeaseDuration and RenewInterval time the Lease (defaults 30s and
	// 10s; shorter in tests).
	LeaseDuration, RenewInterval time.Duration
	// ShutdownTimeout bounds how long requests in flight may take to
	// finish at shutdown before connections are closed.
	ShutdownTimeout time.Duration
	// Logger receives structured logs; the NBD server logs through it
	// too.
	Logger logr.Logger
	// Serving, if set, is called once the NBD server listens with the
	// replicas on disk exported, before the agent reaches the API
	// server: the data path takes its staged volumes back from then on.
	Serving func()
}

// FieldManager is the field manager of node's status reports
// (contract.AgentFieldManager).
func FieldManager(node string) string { return contract.AgentFieldManager(node) }

func (c *Config) setDefaults() error {
	if c.Node == "" {
		return errors.New("node agent: no node name")
	}
	if c.DataDir == "" {
		return errors.New("node agent: no data folder")
	}
	if c.Namespace == "" {
		c.Namespace = DefaultNamespace
	}
	if c.Listen == "" {
		c.Listen = ":" + nbd.DefaultPort
	}
	if c.LeaseDuration <= 0 {
		c.LeaseDuration = DefaultLeaseDuration
	}
	if c.RenewInterval <= 0 {
		c.RenewInterval = DefaultRenewInterval
	}
	if c.LeaseDuration < time.Second {
		return fmt.Errorf("node agent: lease duration %s is shorter than a second, the Lease's unit", c.LeaseDuration)
	}
	if c.RenewInterval >= c.LeaseDuration {
		return fmt.Errorf("node agent: lease renew interval %s must be shorter than the lease duration %s", c.RenewInterval, c.LeaseDuration)
	}
	if c.ShutdownTimeout <= 0 {
		c.ShutdownTimeout = DefaultShutdownTimeout
	}
	return nil
}

// endpoint is host:port where attaching nodes reach the listener l.
func endpoint(advertise string, l net.Addr) (string, error) {
	host, port, err := net.SplitHostPort(l.String())
	if err != nil {
		return "", fmt.Errorf("node agent: listener address %s: %w", l, err)
	}
	if advertise == "" {
		if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
			return "", fmt.Errorf("node agent: listening on all addresses (%s): give the address other nodes reach this one at (--advertise-address, e.g. the node IP)", l)
		}
		advertise = host
	}
	if _, err := strconv.Atoi(port); err != nil {
		return "", fmt.Errorf("node agent: listener port %q: %w", port, err)
	}
	return net.JoinHostPort(advertise, port), nil
}

// Run runs the agent until ctx ends: it serves the node's replicas over
// NBD, keeps them in step with the QuorumVolumes and reports them, and
// renews the node's Lease. On the way out it stops renewing, stops
// taking requests, lets those in flight finish (up to ShutdownTimeout),
// and closes the replicas.
func Run(ctx context.Context, rc *rest.Config, cfg Config) (err error) {
	if err := cfg.setDefaults(); err != nil {
		return err
	}
	log := cfg.Logger.WithValues("node", cfg.Node)
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("node agent: data folder: %w", err)
	}
	// Everything opened before the manager runs is closed if setting up
	// fails; from then on the shutdown below closes it.
	var undo []func() error
	defer func() {
		if err != nil {
			for _, u := range undo {
				u()
			}
		}
	}()
	l, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("node agent: NBD listener: %w", err)
	}
	undo = append(undo, l.Close)
	ep, err := endpoint(cfg.AdvertiseAddress, l.Addr())
	if err != nil {
		return err
	}
	var ul net.Listener
	if cfg.LocalSocket != "" {
		if ul, err = listenUnix(cfg.LocalSocket); err != nil {
			return err
		}
		undo = append(undo, ul.Close)
	}
	srv, err := nbd.NewServer(nbd.ServerConfig{TLS: cfg.TLS, Logger: slog.New(logr.ToSlogHandler(log.WithName("nbd")))})
	if err != nil {
		return err
	}
	undo = append(undo, srv.Close)
	m := newMetrics()
	set := &replicaSet{dir: cfg.DataDir, srv: srv, m: m, log: log, served: map[string]*served{}}
	// Clients (the staged volumes, this node's and others') wait for a
	// restarted agent: it serves what it has before it asks the API
	// server anything.
	set.serveOnDisk()
	undo = append(undo, set.stopAll)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	listeners := []net.Listener{l}
	if ul != nil {
		listeners = append(listeners, ul)
	}
	serveErr := make(chan error, len(listeners))
	for _, l := range listeners {
		go func() {
			err := srv.Serve(l)
			if !errors.Is(err, nbd.ErrServerClosed) {
				cancel() // the agent is useless without its server
			}
			serveErr <- err
		}()
	}
	if cfg.Serving != nil {
		cfg.Serving()
	}
	mgr, err := newManager(rc, cfg, log)
	if err != nil {
		return err
	}
	ml, err := listenMetrics(cfg.MetricsAddress)
	if err != nil {
		return err
	}
	if ml != nil {
		undo = append(undo, ml.Close)
		if err := mgr.Add(&metricsServer{l: ml, h: m.handler(cfg.ExtraMetrics), log: log}); err != nil {
			return fmt.Errorf("node agent: %w", err)
		}
	}
	if err := mgr.Add(&leaseKeeper{
		c: mgr.GetClient(), r: mgr.GetAPIReader(), namespace: cfg.Namespace, node: cfg.Node,
		duration: cfg.LeaseDuration, interval: cfg.RenewInterval, log: log,
	}); err != nil {
		return fmt.Errorf("node agent: %w", err)
	}
	if err := mgr.Add(manager.RunnableFunc(func(ctx context.Context) error {
		logOrphans(ctx, mgr.GetClient(), set, cfg.Node, log)
		return nil
	})); err != nil {
		return fmt.Errorf("node agent: %w", err)
	}
	rec := &reconciler{
		c: mgr.GetClient(), node: cfg.Node, manager: FieldManager(cfg.Node), endpoint: ep,
		set: set, log: log, now: time.Now, reported: map[string][]string{},
	}
	err = ctrl.NewControllerManagedBy(mgr).
		For(&v1alpha1.QuorumVolume{}).
		Named("quorum-agent").
		// Several agents run in one process in tests; names only label
		// the metrics.
		WithOptions(controller.Options{SkipNameValidation: ptr.To(true)}).
		Complete(rec)
	if err != nil {
		return fmt.Errorf("node agent: %w", err)
	}

	log.Info("node agent running", "nbd", l.Addr().String(), "localSocket", cfg.LocalSocket, "endpoint", ep, "tls", cfg.TLS != nil, "dataDir", cfg.DataDir, "namespace", cfg.Namespace)
	if cfg.TLS == nil {
		log.Info("WARNING: serving replicas without TLS: anyone who can reach the address and present a current epoch can write (give --tls-dir)")
	}
	mgrErr := mgr.Start(runCtx)

	sctx, scancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer scancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Error(err, "closed NBD connections with requests still in flight")
	}
	for range listeners {
		if err := <-serveErr; !errors.Is(err, nbd.ErrServerClosed) {
			mgrErr = errors.Join(mgrErr, fmt.Errorf("node agent: NBD server: %w", err))
		}
	}
	if err := set.stopAll(); err != nil {
		mgrErr = errors.Join(mgrErr, err)
	}
	log.Info("node agent stopped")
	return mgrErr
}

func newManager(rc *rest.Config, cfg Config, log logr.Logger) (manager.Manager, error) {
	scheme := kruntime.NewScheme()
	for _, add := range []func(*kruntime.Scheme) error{v1alpha1.AddToScheme, coordinationv1.AddToScheme} {
		if err := add(scheme); err != nil {
			return nil, fmt.Errorf("node agent: scheme: %w", err)
		}
	}
	mgr, err := ctrl.NewManager(rc, ctrl.Options{
		Scheme: scheme,
		Logger: log,
		// Metrics are served by the agent's own server (metricsServer),
		// with its registry beside controller-runtime's.
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		// The manager would otherwise wait 30s for runnables.
		GracefulShutdownTimeout: ptr.To(cfg.ShutdownTimeout),
	})
	if err != nil {
		return nil, fmt.Errorf("node agent: manager: %w", err)
	}
	return mgr, nil
}

// logOrphans logs the images in the data folder that no QuorumVolume
// places on this node. They are left in place: an image is deleted only
// on a deletion the agent observes (the volume's deletionTimestamp, or
// its entry leaving the status while the agent runs).
func logOrphans(ctx context.Context, c client.Reader, set *replicaSet, node string, log logr.Logger) {
	var list v1alpha1.QuorumVolumeList
	if err := c.List(ctx, &list); err != nil {
		log.Error(err, "look for orphaned replicas: list QuorumVolumes")
		return
	}
	placed := map[string]bool{}
	for _, qv := range list.Items {
		for _, e := range qv.Status.Replicas {
			if e.Node == node {
				placed[qv.Name+"/"+e.Name] = true
			}
		}
	}
	vols, err := set.volumesOnDisk()
	if err != nil {
		log.Error(err, "look for orphaned replicas")
		return
	}
	for _, vol := range vols {
		reps, err := set.onDisk(vol)
		if err != nil {
			log.Error(err, "look for orphaned replicas")
			continue
		}
		for _, rep := range reps {
			if placed[vol+"/"+rep] {
				continue
			}
			log.Info("orphaned replica image: no QuorumVolume places it on this node; left in place", "path", set.replicaPath(vol, rep))
			if stopped, err := set.stopUnconfirmed(vol); err != nil {
				log.Error(err, "stop serving an orphaned replica served from disk at start", "volume", vol)
			} else if stopped {
				log.Info("stopped serving the orphaned replica served from disk at start", "volume", vol)
			}
		}
	}
}

// listenUnix listens on the local socket path, making its folder. A
// socket left by an earlier run is removed first: nothing listens on it
// any more, or this listen would fail anyway. Any other file there is an
// error.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("node agent: local socket folder: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() == fs.ModeSocket {
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("node agent: remove stale local socket: %w", err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("node agent: local NBD socket: %w", err)
	}
	return l, nil
}
