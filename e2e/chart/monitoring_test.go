package chart

import (
	"encoding/json"
	"fmt"
	"maps"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/prometheus/promql/parser"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	"sigs.k8s.io/yaml"

	"github.com/quorum-csi/quorum-csi/pkg/agent"
	"github.com/quorum-csi/quorum-csi/pkg/controller"
	"github.com/quorum-csi/quorum-csi/pkg/metrics"
)

// monitoringOn renders the chart's dashboard and alerts.
var monitoringOn = []string{"--set", "monitoring.dashboard.enabled=true", "--set", "monitoring.rules.enabled=true"}

// TestMonitoringNamesExportedSeries renders the chart with the dashboard
// and the rules on, parses every PromQL expression in them with
// Prometheus's own parser, and checks that each series it selects is one
// the binaries export: the names come from the collectors the binaries
// register (the controller's reconciler, the agent's, the volumes' Set)
// and from controller-runtime's registry, which both the controller and
// the data path serve.
func TestMonitoringNamesExportedSeries(t *testing.T) {
	args := append([]string{"template", "quorum-csi", "../../charts/quorum-csi", "--namespace", "quorum-csi", "--kube-version", "v1.37.2",
		"--set", "tls.secretName=quorum-tls"}, monitoringOn...)
	out, err := exec.Command(helm(t), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	exprs := monitoringExprs(t, string(out))
	exported := exportedSeries(t)

	p := parser.NewParser(parser.Options{})
	used := map[string]bool{}
	for _, e := range exprs {
		ast, err := p.ParseExpr(grafanaExpand(e.expr))
		if err != nil {
			t.Errorf("%s: %q does not parse: %v", e.where, e.expr, err)
			continue
		}
		var names []string
		parser.Inspect(ast, func(n parser.Node, _ []parser.Node) error {
			if vs, ok := n.(*parser.VectorSelector); ok {
				names = append(names, selectorName(vs))
			}
			return nil
		})
		if len(names) == 0 {
			t.Errorf("%s: %q selects no series", e.where, e.expr)
		}
		for _, n := range names {
			used[n] = true
			if !exported[n] {
				t.Errorf("%s: %q selects %q, which no binary exports", e.where, e.expr, n)
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

type located struct{ where, expr string }

// monitoringExprs are the PromQL expressions of the rendered chart: the
// dashboard's targets and variable queries, the rules' exprs. It fails
// unless both the dashboard and the rules are there.
func monitoringExprs(t *testing.T, rendered string) []located {
	t.Helper()
	var exprs []located
	var dashboards, rules int
	for _, doc := range strings.Split(rendered, "\n---") {
		var obj struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name   string            `json:"name"`
				Labels map[string]string `json:"labels"`
			} `json:"metadata"`
			Data map[string]string `json:"data"`
			Spec struct {
				Groups []struct {
					Name  string `json:"name"`
					Rules []struct {
						Alert       string            `json:"alert"`
						Record      string            `json:"record"`
						Expr        string            `json:"expr"`
						For         string            `json:"for"`
						Annotations map[string]string `json:"annotations"`
					} `json:"rules"`
				} `json:"groups"`
			} `json:"spec"`
		}
		if err := yaml.Unmarshal([]byte(doc), &obj); err != nil {
			t.Fatalf("rendered document does not parse: %v\n%s", err, doc)
		}
		switch {
		case obj.Kind == "ConfigMap" && obj.Metadata.Labels["grafana_dashboard"] == "1":
			for key, js := range obj.Data {
				dashboards++
				var d any
				if err := json.Unmarshal([]byte(js), &d); err != nil {
					t.Fatalf("dashboard %s: %v", key, err)
				}
				exprs = append(exprs, dashboardExprs(d, key)...)
			}
		case obj.Kind == "PrometheusRule":
			for _, g := range obj.Spec.Groups {
				for _, r := range g.Rules {
					rules++
					where := fmt.Sprintf("rule %s/%s%s", g.Name, r.Alert, r.Record)
					if r.Alert != "" && (r.For == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "") {
						t.Errorf("%s lacks a for, a summary or a description", where)
					}
					exprs = append(exprs, located{where, r.Expr})
				}
			}
		}
	}
	if dashboards != 1 || rules == 0 {
		t.Fatalf("rendered %d dashboards and %d rules, want one dashboard and some rules", dashboards, rules)
	}
	return exprs
}

// dashboardExprs walks a Grafana dashboard for the panels' target exprs
// and the variables' label_values() queries.
func dashboardExprs(node any, where string) []located {
	var out []located
	switch n := node.(type) {
	case map[string]any:
		title, _ := n["title"].(string)
		if title != "" {
			where += " > " + title
		}
		if e, ok := n["expr"].(string); ok {
			out = append(out, located{where, e})
		}
		if def, ok := n["definition"].(string); ok {
			out = append(out, located{where + " (variable)", labelValuesSelector(def)})
		}
		for k, v := range n {
			if k == "definition" || k == "query" && n["definition"] != nil {
				continue
			}
			out = append(out, dashboardExprs(v, where)...)
		}
	case []any:
		for _, v := range n {
			out = append(out, dashboardExprs(v, where)...)
		}
	}
	return out
}

// labelValuesSelector is the series selector of Grafana's
// label_values(SELECTOR, LABEL).
func labelValuesSelector(def string) string {
	m := regexp.MustCompile(`^label_values\((.*),\s*\w+\)$`).FindStringSubmatch(strings.TrimSpace(def))
	if m == nil {
		return def // parsed as it is, and fails if it is not PromQL
	}
	return m[1]
}

// grafanaExpand does what Grafana does before Prometheus sees a query:
// its variables become values.
func grafanaExpand(expr string) string {
	return strings.NewReplacer("$__rate_interval", "1m", "$__interval", "30s", "$__range", "1h", "$volume", ".*").Replace(expr)
}

func selectorName(vs *parser.VectorSelector) string {
	if vs.Name != "" {
		return vs.Name
	}
	for _, m := range vs.LabelMatchers {
		if m.Name == "__name__" {
			return m.Value
		}
	}
	return ""
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
