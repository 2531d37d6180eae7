package csi

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

// sanityAccessEnv selects the access type of one csi-sanity run.
const sanityAccessEnv = "QUORUM_SANITY_ACCESS"

// TestSanity runs csi-sanity against the Controller service and n1's
// Node service, backed by a real API server, the reconciler and three
// real node agents, for mount and for block access. Ginkgo runs one
// suite per process and csi-sanity's volume names are unique per
// process only, so each access type runs in a child process of this
// test binary.
func TestSanity(t *testing.T) {
	if access := os.Getenv(sanityAccessEnv); access != "" {
		runSanity(t, access)
		return
	}
	testutil.RequireKernel(t)
	summary := regexp.MustCompile(`(Ran \d+ of \d+ Specs.*|(SUCCESS|FAIL)! -- .*)`)
	for _, access := range []string{"mount", "block"} {
		t.Run(access, func(t *testing.T) {
			cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestSanity$", "-test.count=1", "-test.v")
			cmd.Env = append(os.Environ(), sanityAccessEnv+"="+access)
			out, err := cmd.CombinedOutput()
			plain := regexp.MustCompile("\x1b\\[[0-9;]*m").ReplaceAllString(string(out), "")
			for _, line := range summary.FindAllString(plain, -1) {
				t.Log(line)
			}
			if err != nil {
				t.Fatalf("csi-sanity with %s access: %v\n%s", access, err, plain)
			}
			if strings.Contains(plain, "--- SKIP: TestSanity") {
				t.Skipf("csi-sanity with %s access skipped:\n%s", access, plain)
			}
		})
	}
}

func runSanity(t *testing.T, access string) {
	e := startNodeEnv(t)
	dir := t.TempDir()
	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + e.socks["n1"]
	cfg.ControllerAddress = "unix://" + e.sock
	cfg.TargetPath = filepath.Join(dir, "target")
	cfg.StagingPath = filepath.Join(dir, "staging")
	cfg.TestVolumeSize = 64 << 20
	cfg.TestVolumeExpandSize = 128 << 20
	cfg.TestVolumeAccessType = access
	cfg.IdempotentCount = 2
	cfg.TestVolumeParameters = map[string]string{ParamReplicas: "3"}
	sanity.Test(t, cfg)
}
