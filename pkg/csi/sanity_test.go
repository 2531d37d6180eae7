package csi

import (
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
)

// TestSanity runs csi-sanity against the Controller service and n1's
// Node service, backed by a real API server, the reconciler and three
// real node agents, for both access types.
func TestSanity(t *testing.T) {
	for _, access := range []string{"mount", "block"} {
		t.Run(access, func(t *testing.T) {
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
		})
	}
}
