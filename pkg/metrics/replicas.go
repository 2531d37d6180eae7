package metrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// replicaCollector reads the replicas' states when Prometheus scrapes,
// so the numbers are never older than the scrape.
type replicaCollector struct {
	state, dirty, resync *prometheus.Desc

	mu      sync.Mutex
	volumes map[string]func() []quorum.ChildStatus
}

func (c *replicaCollector) add(id string, status func() []quorum.ChildStatus) {
	c.mu.Lock()
	c.volumes[id] = status
	c.mu.Unlock()
}

func (c *replicaCollector) remove(id string) {
	c.mu.Lock()
	delete(c.volumes, id)
	c.mu.Unlock()
}

func (c *replicaCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.state
	ch <- c.dirty
	ch <- c.resync
}

var states = []quorum.ChildState{quorum.ChildHealthy, quorum.ChildFaulty, quorum.ChildResyncing}

func (c *replicaCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, status := range c.volumes {
		for _, st := range status() {
			for _, s := range states {
				v := 0.0
				if st.State == s {
					v = 1
				}
				ch <- prometheus.MustNewConstMetric(c.state, prometheus.GaugeValue, v, id, st.Name, string(s))
			}
			ch <- prometheus.MustNewConstMetric(c.dirty, prometheus.GaugeValue, float64(st.DirtyBytes), id, st.Name)
			ch <- prometheus.MustNewConstMetric(c.resync, prometheus.GaugeValue, float64(st.ResyncTotal-st.ResyncDone), id, st.Name)
		}
	}
}
