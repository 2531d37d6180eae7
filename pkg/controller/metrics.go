package controller

import (
	"fmt"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// allPhases are reported even at zero, so a dashboard shows "0 Faulted"
// rather than no data.
var allPhases = []v1alpha1.VolumePhase{
	v1alpha1.VolumePending, v1alpha1.VolumeReady, v1alpha1.VolumeDegraded,
	v1alpha1.VolumeFaulted, v1alpha1.VolumeDeleting,
}

// phaseMetrics is the quorum_volumes gauge: volumes per phase, as last
// reconciled.
type phaseMetrics struct {
	gauge *prometheus.GaugeVec

	mu     sync.Mutex
	phases map[string]v1alpha1.VolumePhase // volume name -> phase
}

func newPhaseMetrics(reg prometheus.Registerer) (*phaseMetrics, error) {
	m := &phaseMetrics{
		gauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "quorum_volumes",
			Help: "QuorumVolumes per phase, as the controller last reconciled them.",
		}, []string{"phase"}),
		phases: map[string]v1alpha1.VolumePhase{},
	}
	if err := reg.Register(m.gauge); err != nil {
		return nil, fmt.Errorf("register quorum_volumes gauge: %w", err)
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
	}
	if phase == "" {
		delete(m.phases, volume)
		return
	}
	m.phases[volume] = phase
	m.gauge.WithLabelValues(string(phase)).Inc()
}
