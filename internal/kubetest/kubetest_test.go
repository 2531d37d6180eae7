package kubetest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/client-go/discovery"
)

// TestStartAndStop starts a server, talks to it through both the rest
// config and kubectl, and checks that no process of it survives the test.
func TestStartAndStop(t *testing.T) {
	var dir string
	t.Run("serve", func(t *testing.T) {
		s := Start(t)
		dir = s.dir
		dc, err := discovery.NewDiscoveryClientForConfig(s.Config)
		if err != nil {
			t.Fatalf("discovery client: %v", err)
		}
		v, err := dc.ServerVersion()
		if err != nil {
			t.Fatalf("server version: %v", err)
		}
		// The build stamps the version; without it kubectl cannot parse it.
		if v.GitVersion != K8sVersion {
			t.Errorf("server version %q, want %q", v.GitVersion, K8sVersion)
		}
		if out, err := s.Kubectl(t, "get", "--raw", "/readyz"); err != nil || strings.TrimSpace(out) != "ok" {
			t.Errorf("kubectl get --raw /readyz = %q, %v; want ok", out, err)
		}
	})
	if dir == "" {
		return // skipped: no binaries
	}
	if left := processesUnder(t, dir); len(left) > 0 {
		t.Errorf("processes left running after the test: %v", left)
	}
}

// TestMissingBinaries skips outside CI and names the build script.
func TestMissingBinaries(t *testing.T) {
	t.Setenv("QUORUM_K8S_BIN", t.TempDir())
	t.Setenv("QUORUM_CI", "")
	var skipped bool
	t.Run("start", func(t *testing.T) {
		defer func() { skipped = t.Skipped() }()
		Start(t)
	})
	if !skipped {
		t.Error("Start without binaries did not skip")
	}
}

// processesUnder lists the command lines of running processes that name a
// path under dir.
func processesUnder(t *testing.T, dir string) []string {
	t.Helper()
	cmdlines, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, f := range cmdlines {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // exited meanwhile
		}
		if cl := strings.ReplaceAll(string(b), "\x00", " "); strings.Contains(cl, dir) {
			found = append(found, cl)
		}
	}
	return found
}

// The build script and BinDir must agree on the version, which is also
// part of the default folder.
func TestVersionMatchesBuildScript(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "hack", "k8s-bins.sh"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "\nK8S_VERSION=" + K8sVersion + "\n"; !strings.Contains(string(b), want) {
		t.Errorf("hack/k8s-bins.sh does not set K8S_VERSION=%s", K8sVersion)
	}
}
