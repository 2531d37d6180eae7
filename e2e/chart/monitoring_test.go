package chart

import (
	"fmt"
	"maps"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/controller"
	"github.com/quorum-csi/quorum-csi/pkg/metrics"
)

// TestMonitoringNamesExportedSeries renders the chart with the dashboard
// and the rules on, parses every PromQL expression in them with
// Prometheus's own parser, and checks that each series it selects is one
// the binaries export: the names come from the collectors the binaries
// register (the controller's reconciler, the agent's, the volumes' Set)
// and from controller-runtime's registry, which both the controller and
// the data path serve.
func TestMonitoringNamesExportedSeries(t *testing.T) {
	args := append([]string{"template", "quorum-csi", "../../charts/quorum-csi", "--namespace", "quorum-csi", "--kube-version", "v1.37.2",
		"--set", "tls.secretName=quorum-tls"}, MonitoringOn...)
	out, err := exec.Command(helm(t), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	exprs, err := MonitoringExprs(string(out))
	if err != nil {
		t.Fatal(err)
	}
	exported := exportedSeries(t)

	used := map[string]bool{}
	for _, e := range exprs {
		names, err := e.SeriesNames()
		if err != nil {
			t.Error(err)
			continue
		}
		for _, n := range names {
			used[n] = true
			if !exported[n] {
				t.Errorf("%s: %q selects %q, which no binary exports", e.Where, e.PromQL, n)
			}
		}
	}
	// What the dashboard and alerts are for: each of these series is
	// looked at somewhere.
	for _, n := range []string{
		"quorum_volume_requests_total", "quorum_volume_bytes_total", "quorum_volume_request_seconds_bucket",
		"quorum_events_total", "quorum_replica_state", "quorum_replica_resync_remaining_bytes",
		"quorum_volume_phase", "quorum_agent_lease_current", "quorum_agent_replicas_served",
	} {
		if !used[n] {
			t.Errorf("no expression looks at %s", n)
		}
	}
	if !t.Failed() {
		t.Logf("%d expressions, %d series names, all exported", len(exprs), len(used))
	}
}

// exportedSeries are the series names the binaries export. Counters
// appear under their full name (client_golang adds no suffix),
// histograms as _bucket, _sum and _count, summaries as the name, _sum
// and _count.
func exportedSeries(t *testing.T) map[string]bool {
	t.Helper()
	rec := &recorder{names: map[string]bool{}}
	// The controller binary: the reconciler's gauges (controller.New
	// registers them in controller-runtime's registry; here in rec).
	if _, err := controller.New(nil, nil, controller.Options{Registerer: rec}); err != nil {
		t.Fatal(err)
	}
	// The data path binary: each staged volume's metrics and the agent's.
	if _, err := metrics.NewSet(rec); err != nil {
		t.Fatal(err)
	}
	for _, c := range agent.MetricCollectors() {
		if err := rec.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	// Both serve controller-runtime's registry: Go and process metrics,
	// and the families it has series for. Those it has none for yet are
	// left out: an expression on them fails here rather than pass
	// unchecked.
	fams, err := ctrlmetrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		for _, n := range seriesNames(f.GetName(), f.GetType()) {
			rec.names[n] = true
		}
	}
	if len(rec.names) < 20 || !rec.names["process_resident_memory_bytes"] {
		t.Fatalf("exported series %v: too few, or no process metrics", slices.Sorted(maps.Keys(rec.names)))
	}
	return rec.names
}

// recorder is a Registerer that notes the series names of what is
// registered, from the collectors' own descriptions.
type recorder struct{ names map[string]bool }

var fqName = regexp.MustCompile(`^Desc\{fqName: "([^"]+)"`)

func (r *recorder) Register(c prometheus.Collector) error {
	typ := dto.MetricType_UNTYPED
	switch c.(type) {
	case prometheus.Histogram, *prometheus.HistogramVec:
		typ = dto.MetricType_HISTOGRAM
	case prometheus.Summary, *prometheus.SummaryVec:
		typ = dto.MetricType_SUMMARY
	}
	ch := make(chan *prometheus.Desc)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		m := fqName.FindStringSubmatch(d.String())
		if m == nil {
			return fmt.Errorf("no name in %s", d)
		}
		for _, n := range seriesNames(m[1], typ) {
			r.names[n] = true
		}
	}
	return nil
}

func (r *recorder) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

func (r *recorder) Unregister(prometheus.Collector) bool { return false }

func seriesNames(name string, typ dto.MetricType) []string {
	switch typ {
	case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
		return []string{name + "_bucket", name + "_sum", name + "_count"}
	case dto.MetricType_SUMMARY:
		return []string{name, name + "_sum", name + "_count"}
	}
	return []string{name}
}
