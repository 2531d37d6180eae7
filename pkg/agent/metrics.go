package agent

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/quorum-csi/quorum-csi/pkg/nbd"
)

// metrics are one agent's Prometheus collectors. Each agent has its own
// registry (tests run several agents in one process); controller-runtime's
// process-wide registry (reconcile counts and errors, work queues, client
// requests) is served beside it.
type metrics struct {
	registry *prometheus.Registry
	served   prometheus.Gauge
	bytes    *prometheus.CounterVec
	ops      *prometheus.CounterVec
	ioErrors *prometheus.CounterVec
	failures *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		served: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "quorum_agent_replicas_served",
			Help: "Replicas this node agent serves over NBD.",
		}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "quorum_agent_replica_bytes_total",
			Help: "Bytes read from or written to a served replica image, by volume and direction (read, write).",
		}, []string{"volume", "op"}),
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "quorum_agent_replica_requests_total",
			Help: "Requests served on a replica image, by volume and operation (read, write, flush, discard, write_zeroes).",
		}, []string{"volume", "op"}),
		ioErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "quorum_agent_replica_io_errors_total",
			Help: "Requests on a replica image that failed, by volume and operation.",
		}, []string{"volume", "op"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "quorum_agent_replica_failures_total",
			Help: "Failed attempts, by volume and action: serve (create, grow or open and export a replica) or delete.",
		}, []string{"volume", "action"}),
	}
	m.registry.MustRegister(m.collectors()...)
	return m
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.served, m.bytes, m.ops, m.ioErrors, m.failures}
}

// MetricCollectors are the collectors an agent registers, new and empty,
// for checks of what the data path exports: the chart's dashboard and
// alerts may name only these series, the volumes' (package metrics) and
// controller-runtime's.
func MetricCollectors() []prometheus.Collector { return newMetrics().collectors() }

// requestOps and failureActions are the label values of a served
// volume's error counters.
var (
	requestOps     = []string{"read", "write", "flush", "discard", "write_zeroes"}
	failureActions = []string{"serve", "delete"}
)

// track starts a served volume's error counters at 0: a counter that
// first appears with its first error has no rate for an alert to see,
// and a dashboard would show no series rather than none failed.
func (m *metrics) track(volume string) {
	for _, op := range requestOps {
		m.ioErrors.WithLabelValues(volume, op)
	}
	for _, action := range failureActions {
		m.failures.WithLabelValues(volume, action)
	}
}

// forget drops a volume's series once the node no longer serves it, so
// that deleted volumes do not accumulate.
func (m *metrics) forget(volume string) {
	for _, v := range []*prometheus.CounterVec{m.bytes, m.ops, m.ioErrors, m.failures} {
		v.DeletePartialMatch(prometheus.Labels{"volume": volume})
	}
}

// handler serves this agent's metrics, controller-runtime's and extra's
// (if not nil).
func (m *metrics) handler(extra prometheus.Gatherer) http.Handler {
	g := prometheus.Gatherers{m.registry, ctrlmetrics.Registry}
	if extra != nil {
		g = append(g, extra)
	}
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{})
}

// metricsServer serves /metrics on a listener until its context ends; a
// manager Runnable that every replica of the manager runs.
type metricsServer struct {
	l   net.Listener
	h   http.Handler
	log logr.Logger
}

func (s *metricsServer) NeedLeaderElection() bool { return false }

func (s *metricsServer) Start(ctx context.Context) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", s.h)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(s.l) }()
	s.log.Info("serving metrics", "address", s.l.Addr().String())
	select {
	case err := <-done:
		return fmt.Errorf("metrics server on %s: %w", s.l.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("metrics server on %s: shutdown: %w", s.l.Addr(), err)
	}
	return nil
}

// errStopped is returned for requests that reach a replica after the
// agent stopped serving it.
var errStopped = fmt.Errorf("replica is no longer served: %w", syscall.ESHUTDOWN)

// backend wraps an export's backend. It counts requests when m is set
// (the image; the sidecar's small metadata traffic is not the volume's
// I/O), and it lets the agent wait for requests in flight before it
// closes the replica: the NBD server's RemoveExport ends connections but
// does not wait for the requests they had started.
type backend struct {
	nbd.Backend
	volume string
	export string   // the name it is served under
	m      *metrics // nil: no counting

	mu      sync.RWMutex // held shared by every request, exclusively by drain
	stopped bool
}

// drain waits for the requests in flight and refuses any later one.
func (b *backend) drain() {
	b.mu.Lock()
	b.stopped = true
	b.mu.Unlock()
}

// do runs one request under the drain lock and counts it.
func (b *backend) do(op string, n int64, fn func() error) error {
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.stopped {
		return errStopped
	}
	err := fn()
	if b.m == nil {
		return err
	}
	b.m.ops.WithLabelValues(b.volume, op).Inc()
	if err != nil {
		b.m.ioErrors.WithLabelValues(b.volume, op).Inc()
	} else if n > 0 {
		b.m.bytes.WithLabelValues(b.volume, op).Add(float64(n))
	}
	return err
}

func (b *backend) ReadAt(ctx context.Context, p []byte, off int64) error {
	return b.do("read", int64(len(p)), func() error { return b.Backend.ReadAt(ctx, p, off) })
}

func (b *backend) WriteAt(ctx context.Context, p []byte, off int64) error {
	return b.do("write", int64(len(p)), func() error { return b.Backend.WriteAt(ctx, p, off) })
}

func (b *backend) Flush(ctx context.Context) error {
	return b.do("flush", 0, func() error { return b.Backend.Flush(ctx) })
}

func (b *backend) Discard(ctx context.Context, off, length int64) error {
	return b.do("discard", 0, func() error { return b.Backend.Discard(ctx, off, length) })
}

func (b *backend) WriteZeroes(ctx context.Context, off, length int64) error {
	return b.do("write_zeroes", 0, func() error { return b.Backend.WriteZeroes(ctx, off, length) })
}

// BlockSize forwards the wrapped backend's, so the server still refuses
// requests the image cannot take with direct I/O.
func (b *backend) BlockSize() int64 {
	if bs, ok := b.Backend.(nbd.BlockSizer); ok {
		return bs.BlockSize()
	}
	return 1
}

// Extents forwards the allocation map; a backend without one is all
// data, which the protocol allows.
func (b *backend) Extents(ctx context.Context, off, length int64) ([]nbd.Extent, error) {
	el, ok := b.Backend.(nbd.ExtentLister)
	if !ok {
		return []nbd.Extent{{Length: uint32(min(length, 1<<30))}}, nil
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.stopped {
		return nil, errStopped
	}
	return el.Extents(ctx, off, length)
}

// listenMetrics opens the metrics address, or returns nil for "0" or "".
func listenMetrics(addr string) (net.Listener, error) {
	if addr == "" || addr == "0" {
		return nil, nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics address %s: %w", addr, err)
	}
	return l, nil
}
