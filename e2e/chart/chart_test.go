// Package chart checks the Helm chart against a real API server: every
// object it renders must pass the server's own validation.
package chart

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

func helm(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("QUORUM_TOOLS_BIN")
	if dir == "" {
		dir = "/var/cache/quorum-csi/tools"
	}
	bin := filepath.Join(dir, "helm")
	if _, err := os.Stat(bin); err != nil {
		testutil.Unavailable(t, "needs helm in "+dir+" (hack/tools.sh builds it)")
	}
	return bin
}

// TestChartAppliesToAPIServer renders the chart with its defaults, with
// custom classes, and with the dashboard and alerts on, and applies the result with a
// server-side dry run: the API server validates each object (schemas,
// RBAC rules, the CRD) as it would on install.
func TestChartAppliesToAPIServer(t *testing.T) {
	bin := helm(t)
	srv := kubetest.Start(t)
	if _, err := srv.Kubectl(t, "create", "namespace", "quorum-csi"); err != nil {
		t.Fatal(err)
	}
	// The PrometheusRule's kind, as the Prometheus Operator would have
	// installed it.
	if _, err := srv.Kubectl(t, "apply", "-f", "testdata/prometheusrule-crd.yaml"); err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Kubectl(t, "wait", "--for=condition=Established", "--timeout=30s", "crd/prometheusrules.monitoring.coreos.com"); err != nil {
		t.Fatal(err)
	}
	dashboard, rule := "configmap/quorum-csi-dashboard", "prometheusrule.monitoring.coreos.com/quorum-csi"
	t.Run("notes", func(t *testing.T) { testNotes(t, bin, srv) })
	for _, tc := range []struct {
		name   string
		set    []string
		want   []string
		absent []string
	}{
		{"defaults", []string{"--set", "tls.secretName=quorum-tls"}, []string{"csidriver.storage.k8s.io/quorum.csi.dev", "storageclass.storage.k8s.io/quorum-fifo", "daemonset.apps/quorum-csi-node", "daemonset.apps/quorum-csi-datapath", "deployment.apps/quorum-csi-controller", "customresourcedefinition.apiextensions.k8s.io/quorumvolumes.quorum.csi.dev"}, []string{dashboard, rule}},
		{"one class", []string{"--set", "tls.secretName=quorum-tls", "--set", "storageClasses[0].name=only", "--set", "storageClasses[0].default=true"}, []string{"storageclass.storage.k8s.io/only"}, nil},
		{"monitoring", append([]string{"--set", "tls.secretName=quorum-tls"}, MonitoringOn...), []string{dashboard, rule, "daemonset.apps/quorum-csi-datapath"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"template", "quorum-csi", "../../charts/quorum-csi", "--namespace", "quorum-csi", "--kube-version", "v1.37.2", "--include-crds"}, tc.set...)
			out, err := exec.Command(bin, args...).CombinedOutput()
			if err != nil {
				t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			rendered := filepath.Join(t.TempDir(), "chart.yaml")
			if err := os.WriteFile(rendered, out, 0o600); err != nil {
				t.Fatal(err)
			}
			applied, err := srv.Kubectl(t, "apply", "--dry-run=server", "-f", rendered)
			if err != nil {
				t.Fatalf("the API server refused the chart: %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(applied, w) {
					t.Errorf("dry run lacks %s:\n%s", w, applied)
				}
			}
			for _, a := range tc.absent {
				if strings.Contains(applied, a) {
					t.Errorf("dry run has %s, which is off by default:\n%s", a, applied)
				}
			}
			if n := strings.Count(string(out), "secretName: quorum-tls"); n != 2 {
				t.Errorf("the TLS Secret is mounted %d times, want by both node DaemonSets", n)
			}
		})
	}
}

// testNotes: what helm prints after an install tells how to see the
// driver work, with the release's names in it. helm renders NOTES.txt
// only on install, here a dry run against the API server.
func testNotes(t *testing.T, bin string, srv *kubetest.Server) {
	cmd := exec.Command(bin, "install", "quorum-csi", "../../charts/quorum-csi", "--namespace", "quorum-csi", "--dry-run=server",
		"--kubeconfig", srv.Kubeconfig, "--set", "tls.secretName=quorum-tls", "--set", "storageClasses[0].name=only",
		"--set", "storageClasses[0].default=true")
	home := t.TempDir() // helm's cache and config, not the user's
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home, "HELM_CONFIG_HOME="+home, "HELM_DATA_HOME="+home)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helm install --dry-run=server: %v\n%s", err, out)
	}
	_, notes, ok := strings.Cut(string(out), "\nNOTES:\n")
	if !ok {
		t.Fatalf("no NOTES in helm's output:\n%s", out)
	}
	for _, want := range []string{
		"kubectl -n quorum-csi rollout status daemonset/quorum-csi-datapath",
		"storageClassName: only",
		"kubectl get qv",
		"kubectl delete pod/quorum-test pvc/quorum-test",
		"port-forward deployment/quorum-csi-controller 8080",
		":9809/metrics",
		"--set monitoring.dashboard.enabled=true",
	} {
		if !strings.Contains(notes, want) {
			t.Errorf("NOTES lack %q:\n%s", want, notes)
		}
	}
}

// TestChartNeedsTLS: without a TLS Secret the chart refuses to render,
// saying what to give.
func TestChartNeedsTLS(t *testing.T) {
	out, err := exec.Command(helm(t), "template", "quorum-csi", "../../charts/quorum-csi", "--kube-version", "v1.37.2").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "tls.secretName") {
		t.Fatalf("helm template without tls.secretName: err %v, output:\n%s", err, out)
	}
}
