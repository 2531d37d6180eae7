package controller

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// allPhases are reported even at zero, so a dashboard shows "0 Faulted"
// rather than no data.
var allPhases = []v1alpha1.VolumePhase{
	v1alpha1.VolumePending, v1alpha1.VolumeReady, v1alpha1.VolumeDegraded,
	v1alpha1.VolumeFaulted, v1alpha1.VolumeDeleting,
}

// phaseMetrics are the quorum_volumes gauge, volumes per phase, and
// quorum_volume_phase, each volume's phase (one series per volume, at
// 1), both as last reconciled. The second says which volume has been
// Degraded for how long, which a count per phase cannot.
type phaseMetrics struct {
	gauge  *prometheus.GaugeVec
	volume *prometheus.GaugeVec

	mu     sync.Mutex
	phases map[string]v1alpha1.VolumePhase // volume name -> phase
}

func newPhaseMetrics(reg prometheus.Registerer) (*phaseMetrics, error) {
	m := &phaseMetrics{
		gauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "quorum_volumes",
			Help: "QuorumVolumes per phase, as the controller last reconciled them.",
		}, []string{"phase"}),
		volume: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "quorum_volume_phase",
			Help: "1 for the QuorumVolume's phase (Pending, Ready, Degraded, Faulted, Deleting), as the controller last reconciled it; one series per volume.",
		}, []string{"volume", "phase"}),
		phases: map[string]v1alpha1.VolumePhase{},
	}
	for _, c := range []prometheus.Collector{m.gauge, m.volume} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register the phase metrics: %w", err)
		}
	}
	for _, p := range allPhases {
		m.gauge.WithLabelValues(string(p)).Set(0)
	}
	return m, nil
}

// set records volume's phase; "" forgets a volume that is gone.
func (m *phaseMetrics) set(volume string, phase v1alpha1.VolumePhase) {
	m.mu.Lock()
	defer m.mu.Unlock()
	old, had := m.phases[volume]
	if had && old == phase {
		return
	}
	if had {
		m.gauge.WithLabelValues(string(old)).Dec()
		m.volume.DeleteLabelValues(volume, string(old))
	}
	if phase == "" {
		delete(m.phases, volume)
		return
	}
	m.phases[volume] = phase
	m.gauge.WithLabelValues(string(phase)).Inc()
	m.volume.WithLabelValues(volume, string(phase)).Set(1)
}

// leaseCollector is quorum_agent_lease_current: for every node with an
// agent Lease, 1 while its agent holds the Lease and renews it, 0 once it
// expired or is held by another; read from the controller's cache at each
// scrape, with the same test as placement (cluster.agentLive). A Lease
// whose Node is gone is left out: nothing will renew it, and no replica
// is placed there.
type leaseCollector struct {
	desc    *prometheus.Desc
	observe func(context.Context) (*cluster, error)
}

// leaseScrapeTimeout bounds a scrape's reads; they come from the cache.
const leaseScrapeTimeout = 5 * time.Second

func newLeaseCollector(observe func(context.Context) (*cluster, error)) *leaseCollector {
	return &leaseCollector{
		desc: prometheus.NewDesc("quorum_agent_lease_current",
			"1 while the node's agent holds its Lease and renews it, 0 once the Lease expired or another holds it; for each node with an agent Lease, as the controller sees them.",
			[]string{"node"}, nil),
		observe: observe,
	}
}

func (c *leaseCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *leaseCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), leaseScrapeTimeout)
	defer cancel()
	cl, err := c.observe(ctx)
	if err != nil {
		// No series rather than a failed scrape: the other metrics
		// still count, and an alert on an absent series says so.
		log.Log.WithName("metrics").Error(err, "agent leases for quorum_agent_lease_current")
		return
	}
	for node := range cl.leases {
		if _, ok := cl.nodes[node]; !ok {
			continue
		}
		v := 0.0
		if live, _ := cl.agentLive(node); live {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, v, node)
	}
}
