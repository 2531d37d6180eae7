package chart

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// opaque values are maps whose keys are the user's (resources,
// selectors, labels): the table lists them whole.
var opaque = []string{"resources", "holderResources", "nodeSelector", "labels", "annotations"}

// TestReadmeListsEveryValue: the chart README's values table has a row
// for every value in values.yaml, and no row for a value that is not.
func TestReadmeListsEveryValue(t *testing.T) {
	raw, err := os.ReadFile("../../charts/quorum-csi/values.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var values map[string]any
	if err := yaml.Unmarshal(raw, &values); err != nil {
		t.Fatal(err)
	}
	var paths []string
	var walk func(prefix string, v any)
	walk = func(prefix string, v any) {
		m, ok := v.(map[string]any)
		if !ok || len(m) == 0 || slices.Contains(opaque, prefix[strings.LastIndex(prefix, ".")+1:]) {
			paths = append(paths, prefix)
			return
		}
		for k, sub := range m {
			walk(strings.TrimPrefix(prefix+"."+k, "."), sub)
		}
	}
	walk("", values)

	readme, err := os.ReadFile("../../charts/quorum-csi/README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, table, ok := strings.Cut(string(readme), "\n| value | default | what it does |\n")
	if !ok {
		t.Fatal("README.md has no values table")
	}
	table, _, _ = strings.Cut(table, "\n\n")
	var rows []string
	for _, m := range regexp.MustCompile("(?m)^\\| `([^`]+)` \\|").FindAllStringSubmatch(table, -1) {
		rows = append(rows, m[1])
	}
	for _, p := range paths {
		if !slices.Contains(rows, p) {
			t.Errorf("values.yaml has %s, the README's table does not", p)
		}
	}
	for _, r := range rows {
		if !slices.Contains(paths, r) {
			t.Errorf("the README's table has %s, values.yaml does not", r)
		}
	}
	if !t.Failed() {
		t.Logf("%d values, each in the table", len(paths))
	}
}
