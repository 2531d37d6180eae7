package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/quorum-csi/quorum-csi/pkg/attach"
	"github.com/quorum-csi/quorum-csi/pkg/metrics"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// syncWriter serialises lines from concurrent event callbacks.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// eventPrinter writes engine events as JSON lines.
func eventPrinter(w io.Writer) func(quorum.Event) {
	return func(e quorum.Event) {
		b, _ := json.Marshal(struct {
			Time string `json:"time"`
			quorum.Event
		}{time.Now().UTC().Format(time.RFC3339Nano), e})
		w.Write(append(b, '\n'))
	}
}

type engineFlags struct {
	threshold  *uint64
	pattern    string
	rewrite    bool
	strict     bool
	cpuProfile string
}

func (f *engineFlags) register(fs *flag.FlagSet) {
	f.threshold = positiveUint(fs, "vote-threshold", "children that must succeed or agree, 1 to N (default: a majority of N)")
	fs.StringVar(&f.pattern, "read-pattern", "quorum", "quorum: read all children and vote; fifo: read the first healthy child in the given order")
	fs.BoolVar(&f.rewrite, "rewrite-corrupted", false, "rewrite children that lost a vote with the winning data (read pattern quorum)")
	fs.BoolVar(&f.strict, "strict", false, "fail any read on which children disagree (like QEMU's blkverify; read pattern quorum)")
	fs.StringVar(&f.cpuProfile, "cpu-profile", "", "write a Go CPU profile of the run to this file (for performance work)")
}

func (f *engineFlags) options(onEvent func(quorum.Event)) (volume.Options, error) {
	p, err := quorum.ParseReadPattern(f.pattern)
	if err != nil {
		return volume.Options{}, fmt.Errorf("%w: --read-pattern: %v", errUsage, err)
	}
	// Clamped only so that no value wraps: any beyond N is refused as
	// out of range by the engine.
	return volume.Options{VoteThreshold: int(min(*f.threshold, 1<<20)), ReadPattern: p, RewriteCorrupted: f.rewrite, Strict: f.strict, OnEvent: onEvent}, nil
}

func runAttach(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("attach", "[flags] REPLICA... (image paths or NBD URIs, in fifo order: the local replica first)", stderr)
	var ef engineFlags
	ef.register(fs)
	stateDir := fs.String("state-dir", defaultStateDir(), "folder for the private FUSE mount point and the status socket (env QUORUM_STATE_DIR)")
	probeEvery := positiveDuration(fs, "probe-interval", 2*time.Second, "how often faulty replicas are asked whether they answer again")
	scrubRate := sizeFlag{n: 4 << 20, allowZero: true}
	fs.Var(&scrubRate, "scrub-rate", "bytes per second of the background scrub, which votes across replicas and repairs minorities (0: no background scrub)")
	scrubInterval := positiveDuration(fs, "scrub-interval", 24*time.Hour, "time between background scrub passes; the first starts at attach")
	epoch := positiveUint(fs, "epoch", "epoch presented to replica servers for NBD replicas whose URI has no @epoch=N, 1 or more: it must not be older than the last attach's, and a newer one fences that attach (default: none; every NBD URI must then carry one)")
	standby := fs.Bool("standby", false, "attach as a live migration's target while another attach still writes: give an --epoch newer than that attach's (an equal one would not fence it) and a --state-dir of its own; every replica must be an NBD URI. The device serves reads and takes nothing over (no flush, no metadata or journal write, no recovery, resync or scrub); a flush succeeds without taking anything over (nothing was written through it), and its first write, discard or write-zeroes fences the other attach, reads the replicas' metadata and journal again, recovers what that attach had in flight, then serves")
	frontend := fs.String("frontend", "auto", "how the volume becomes a block device: ublk (/dev/ublkbN; Linux 6.4+ with ublk_drv), fuse-loop (/dev/loopN over a private FUSE file) or auto (ublk when /dev/ublk-control exists on Linux 6.4+, else fuse-loop)")
	metricsAddr := fs.String("metrics-address", "", "serve Prometheus metrics of the volume (requests, latency, events, replica states) at http://ADDR/metrics; empty: off")
	nbdTimeout := positiveDuration(fs, "nbd-timeout", 10*time.Second, "how long a request to an NBD replica may take, waiting for a reconnect included, before that replica is left out (it resyncs when it answers again); a server that restarts within it costs no replica")
	faults := faultFlag{}
	fs.Var(faults, "fault-file", "REPLICA=FILE: while FILE exists, every request to REPLICA fails with EIO (for testing failure handling; repeatable)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if err := needArgs(pos, "replicas"); err != nil {
		return err
	}
	if *frontend, err = attach.ResolveFrontend(*frontend); err != nil {
		return fmt.Errorf("%w: --%w", errUsage, err)
	}
	errw := &syncWriter{w: stderr}
	log := slog.New(slog.NewJSONHandler(errw, nil))
	opts, err := ef.options(eventPrinter(errw))
	if err != nil {
		return err
	}
	opts.FaultFiles = faults
	opts.Epoch = *epoch
	opts.Standby = *standby
	opts.RequestTimeout = *nbdTimeout
	opts.Logger = log
	stopProfile, err := profileCPU(ef.cpuProfile)
	if err != nil {
		return err
	}
	defer stopProfile()
	// Signals are caught from here on so that one arriving while we set
	// up still ends in a clean detach (or, SIGUSR1, a release).
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1)
	defer signal.Stop(sigs)

	if err := os.MkdirAll(*stateDir, 0o700); err != nil {
		return fmt.Errorf("state folder: %w", err)
	}
	cfg := volume.AttachConfig{
		Replicas:      pos,
		Options:       opts,
		Frontend:      *frontend,
		ProbeInterval: *probeEvery,
		ScrubRate:     scrubRate.n,
		ScrubInterval: *scrubInterval,
		Logger:        log,
	}
	if *metricsAddr != "" {
		set, addr, stop, err := serveMetrics(*metricsAddr)
		if err != nil {
			return err
		}
		defer stop()
		cfg.Metrics = set
		log.Info("serving metrics", "address", addr)
	}
	cfg.StateDir = *stateDir
	av, err := volume.Attach(context.Background(), cfg)
	if err != nil {
		return err
	}
	dev := av.Device
	stopStatus, err := serveStatus(context.Background(), *stateDir, dev.Path(), av.Volume)
	if err != nil {
		return errors.Join(err, av.ForceDetach())
	}
	defer stopStatus()
	if dev.TakenBack() {
		log.Info("took back the device of an attach that died", "device", dev.Path(), "frontend", *frontend)
	}
	log.Info("attached", "device", dev.Path(), "replicas", len(pos), "voteThreshold", av.VoteThreshold(), "readPattern", av.ReadPattern(), "frontend", *frontend, "replicaIO", replica.IOMethod())
	fmt.Fprintln(stdout, dev.Path())

	sig := <-sigs
	// A second signal gives up waiting for the device's users (or, on
	// release, for the requests in hand).
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		select {
		case <-sigs:
			cancel()
		case <-ctx.Done():
		}
	}()
	if sig == syscall.SIGUSR1 {
		defer cancel()
		return releaseDevice(ctx, av, log)
	}
	log.Info("detaching", "signal", sig.String(), "device", dev.Path())
	derr := av.Detach(ctx)
	cancel()
	if errors.Is(derr, attach.ErrBusy) {
		log.Error("second signal: forcing detach; users of the device see I/O errors", "device", dev.Path(), "error", derr)
		ferr := av.ForceDetach()
		return errors.Join(fmt.Errorf("forced detach of %s while it was in use", dev.Path()), ferr)
	}
	if derr != nil {
		return derr
	}
	log.Info("detached", "device", dev.Path())
	return nil
}

// releaseDevice answers SIGUSR1, the planned half of a handover to a new
// process (an upgrade): the device is let go of, not removed, its users'
// requests wait, and the next attach of the volume with the same
// --state-dir takes it back. When ctx ends it stops waiting for the
// requests in hand (the kernel requeues them for the next attach); the
// volume is closed clean only when no request can still be running, else
// the next attach recovers what was in flight.
func releaseDevice(ctx context.Context, av *volume.Attached, log *slog.Logger) error {
	path := av.Device.Path()
	log.Info("releasing the device for the next attach to take back", "device", path)
	if err := av.Release(ctx); err != nil {
		return fmt.Errorf("%w (the replicas stay unclean: the next attach recovers what was in flight)", err)
	}
	log.Info("released", "device", path)
	return nil
}

// serveMetrics serves the metrics of the volumes added to the returned
// set, and the process's, over HTTP at addr until stop.
func serveMetrics(addr string) (_ *metrics.Set, listening string, stop func(), _ error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	set, err := metrics.NewSet(reg)
	if err != nil {
		return nil, "", nil, err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, "", nil, fmt.Errorf("metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	return set, l.Addr().String(), func() { srv.Close() }, nil
}

func closeAfter(vol *volume.Volume, err error) error {
	return errors.Join(err, vol.Close(context.Background()))
}

// faultFlag collects --fault-file REPLICA=FILE pairs.
type faultFlag map[string]string

func (f faultFlag) String() string { return fmt.Sprint(map[string]string(f)) }

func (f faultFlag) Set(s string) error {
	rep, file, ok := strings.Cut(s, "=")
	if !ok || rep == "" || file == "" {
		return fmt.Errorf("want REPLICA=FILE, got %q", s)
	}
	f[rep] = file
	return nil
}
