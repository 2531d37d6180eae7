// Package metrics exports what an attached volume does to Prometheus:
// requests by kind (bytes, count, errors, latency), the engine's events
// (QUORUM_FAILURE, REPORT_BAD) and each replica's state and what it
// misses. quorumctl attach and the node's data path (cmd/datapath) each
// make a Set; volume.Attach registers one Volume in it per attached
// volume.
package metrics

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// Set holds the metric families; register it once per process and add
// volumes to it.
type Set struct {
	bytes    *prometheus.CounterVec
	requests *prometheus.CounterVec
	errors   *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	events   *prometheus.CounterVec
	replicas *replicaCollector
}

// NewSet makes the families and registers them with reg.
func NewSet(reg prometheus.Registerer) (*Set, error) {
	s := &Set{
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "quorum_volume_bytes_total", Help: "Bytes read, written, discarded or zeroed through the volume's device.",
		}, []string{"volume", "op"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "quorum_volume_requests_total", Help: "Requests served on the volume's device, by kind.",
		}, []string{"volume", "op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "quorum_volume_request_errors_total", Help: "Requests that failed (an I/O error for the device's user).",
		}, []string{"volume", "op"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "quorum_volume_request_seconds", Help: "Time to serve a request, from the engine's view.",
			// 50 µs to about 3 s: local NVMe to a struggling remote replica.
			Buckets: prometheus.ExponentialBuckets(50e-6, 3, 11),
		}, []string{"volume", "op"}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "quorum_events_total", Help: "Engine events: QUORUM_FAILURE (a request failed its vote or threshold) and REPORT_BAD (a replica failed or lost a vote).",
		}, []string{"volume", "event", "op"}),
		replicas: &replicaCollector{
			state: prometheus.NewDesc("quorum_replica_state", "1 for the replica's current state (healthy, faulty, resyncing).",
				[]string{"volume", "replica", "state"}, nil),
			dirty: prometheus.NewDesc("quorum_replica_out_of_sync_bytes", "Bytes the replica misses: written while it was faulty, not yet copied to it.",
				[]string{"volume", "replica"}, nil),
			resync: prometheus.NewDesc("quorum_replica_resync_remaining_bytes", "Bytes the running resync still has to copy to the replica.",
				[]string{"volume", "replica"}, nil),
			volumes: map[string]func() []quorum.ChildStatus{},
		},
	}
	for _, c := range []prometheus.Collector{s.bytes, s.requests, s.errors, s.latency, s.events, s.replicas} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Volume measures one attached volume.
type Volume struct {
	set *Set
	id  string
}

// AddVolume starts measuring the volume id; status reports its replicas
// (the engine's Status). Remove it at detach.
func (s *Set) AddVolume(id string, status func() []quorum.ChildStatus) *Volume {
	s.replicas.add(id, status)
	return &Volume{set: s, id: id}
}

// Remove stops reporting the volume's replicas and drops its series.
func (v *Volume) Remove() {
	v.set.replicas.remove(v.id)
	for _, vec := range []*prometheus.CounterVec{v.set.bytes, v.set.requests, v.set.errors, v.set.events} {
		vec.DeletePartialMatch(prometheus.Labels{"volume": v.id})
	}
	v.set.latency.DeletePartialMatch(prometheus.Labels{"volume": v.id})
}

// Event counts an engine event; chain it into quorum.Config.OnEvent.
func (v *Volume) Event(e quorum.Event) {
	v.set.events.WithLabelValues(v.id, string(e.Type), string(e.Op)).Inc()
}

// Instrument wraps what the frontend serves so that every request is
// measured. The series are looked up here, once, not on every request.
func (v *Volume) Instrument(c quorum.Child) quorum.Child {
	series := func(op quorum.Op) *opMetrics {
		s, id, o := v.set, v.id, string(op)
		return &opMetrics{
			bytes:    s.bytes.WithLabelValues(id, o),
			requests: s.requests.WithLabelValues(id, o),
			errors:   s.errors.WithLabelValues(id, o),
			latency:  s.latency.WithLabelValues(id, o),
		}
	}
	return &instrumented{Child: c,
		read: series(quorum.OpRead), write: series(quorum.OpWrite), flush: series(quorum.OpFlush),
		discard: series(quorum.OpDiscard), zeroes: series(quorum.OpWriteZeroes)}
}

type opMetrics struct {
	bytes, requests, errors prometheus.Counter
	latency                 prometheus.Observer
}

// instrumented holds each operation's series in a field of its own, so a
// request finds them without a lookup.
type instrumented struct {
	quorum.Child
	read, write, flush, discard, zeroes *opMetrics
}

func (m *opMetrics) observe(n int64, start time.Time, err error) {
	m.requests.Inc()
	m.latency.Observe(time.Since(start).Seconds())
	if err != nil {
		m.errors.Inc()
		return
	}
	if n > 0 {
		m.bytes.Add(float64(n))
	}
}

func (i *instrumented) ReadAt(ctx context.Context, p []byte, off int64) error {
	start := time.Now()
	err := i.Child.ReadAt(ctx, p, off)
	i.read.observe(int64(len(p)), start, err)
	return err
}

func (i *instrumented) WriteAt(ctx context.Context, p []byte, off int64) error {
	start := time.Now()
	err := i.Child.WriteAt(ctx, p, off)
	i.write.observe(int64(len(p)), start, err)
	return err
}

func (i *instrumented) Flush(ctx context.Context) error {
	start := time.Now()
	err := i.Child.Flush(ctx)
	i.flush.observe(0, start, err)
	return err
}

func (i *instrumented) Discard(ctx context.Context, off, length int64) error {
	start := time.Now()
	err := i.Child.Discard(ctx, off, length)
	i.discard.observe(length, start, err)
	return err
}

func (i *instrumented) WriteZeroes(ctx context.Context, off, length int64) error {
	start := time.Now()
	err := i.Child.WriteZeroes(ctx, off, length)
	i.zeroes.observe(length, start, err)
	return err
}
