package chart

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/yaml"
)

// MonitoringOn are the helm flags that render the chart's dashboard and
// alerts.
var MonitoringOn = []string{"--set", "monitoring.dashboard.enabled=true", "--set", "monitoring.rules.enabled=true"}

// Expr is a PromQL expression of the chart's dashboard or rules, and
// where it stands.
type Expr struct{ Where, PromQL string }

// MonitoringExprs are the PromQL expressions of a chart rendered with
// MonitoringOn: the dashboard's targets and variable queries, the
// rules' exprs. It fails unless both the dashboard and the rules are
// there and every alert has a for, a summary and a description.
func MonitoringExprs(rendered string) ([]Expr, error) {
	var problems []error
	var exprs []Expr
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
			return nil, fmt.Errorf("rendered document does not parse: %w\n%s", err, doc)
		}
		switch {
		case obj.Kind == "ConfigMap" && obj.Metadata.Labels["grafana_dashboard"] == "1":
			for key, js := range obj.Data {
				dashboards++
				var d any
				if err := json.Unmarshal([]byte(js), &d); err != nil {
					return nil, fmt.Errorf("dashboard %s: %w", key, err)
				}
				exprs = append(exprs, dashboardExprs(d, key)...)
			}
		case obj.Kind == "PrometheusRule":
			for _, g := range obj.Spec.Groups {
				for _, r := range g.Rules {
					rules++
					where := fmt.Sprintf("rule %s/%s%s", g.Name, r.Alert, r.Record)
					if r.Alert != "" && (r.For == "" || r.Annotations["summary"] == "" || r.Annotations["description"] == "") {
						problems = append(problems, fmt.Errorf("%s lacks a for, a summary or a description", where))
					}
					exprs = append(exprs, Expr{Where: where, PromQL: r.Expr})
				}
			}
		}
	}
	if dashboards != 1 || rules == 0 {
		problems = append(problems, fmt.Errorf("rendered %d dashboards and %d rules, want one dashboard and some rules", dashboards, rules))
	}
	return exprs, errors.Join(problems...)
}

// SeriesNames parses the expression as Prometheus does (after Grafana's
// variables are expanded) and returns the series names it selects.
func (e Expr) SeriesNames() ([]string, error) {
	ast, err := parser.NewParser(parser.Options{}).ParseExpr(grafanaExpand(e.PromQL))
	if err != nil {
		return nil, fmt.Errorf("%s: %q does not parse: %w", e.Where, e.PromQL, err)
	}
	var names []string
	parser.Inspect(ast, func(n parser.Node, _ []parser.Node) error {
		if vs, ok := n.(*parser.VectorSelector); ok {
			names = append(names, selectorName(vs))
		}
		return nil
	})
	if len(names) == 0 {
		return nil, fmt.Errorf("%s: %q selects no series", e.Where, e.PromQL)
	}
	return names, nil
}

// dashboardExprs walks a Grafana dashboard for the panels' target exprs
// and the variables' label_values() queries.
func dashboardExprs(node any, where string) []Expr {
	var out []Expr
	switch n := node.(type) {
	case map[string]any:
		title, _ := n["title"].(string)
		if title != "" {
			where += " > " + title
		}
		if e, ok := n["expr"].(string); ok {
			out = append(out, Expr{Where: where, PromQL: e})
		}
		if def, ok := n["definition"].(string); ok {
			out = append(out, Expr{Where: where + " (variable)", PromQL: labelValuesSelector(def)})
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
