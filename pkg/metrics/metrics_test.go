package metrics_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"

	"github.com/quorum-csi/quorum-csi/pkg/metrics"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// TestVolumeMetrics drives a real volume (three replica files) through
// the instrumented engine, fails one replica with a fault file, and
// reads what a scrape would see.
func TestVolumeMetrics(t *testing.T) {
	dir := t.TempDir()
	ps := []string{filepath.Join(dir, "a"), filepath.Join(dir, "b"), filepath.Join(dir, "c")}
	if err := replica.Create(ps, 1<<20); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	set, err := metrics.NewSet(reg)
	if err != nil {
		t.Fatal(err)
	}
	var m *metrics.Volume
	fault := filepath.Join(dir, "fail-c")
	vol, err := volume.Open(context.Background(), ps, volume.Options{
		OnEvent:    func(e quorum.Event) { m.Event(e) },
		FaultFiles: map[string]string{ps[2]: fault},
	})
	if err != nil {
		t.Fatal(err)
	}
	m = set.AddVolume("vol1", vol.Status)
	dev := m.Instrument(vol.Engine)
	ctx := context.Background()
	buf := bytes.Repeat([]byte{7}, 8192)
	if err := dev.WriteAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	if err := dev.ReadAt(ctx, buf, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(fault, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// The fault file is polled; write until c has failed a request.
	for i := 0; !vol.Faulty(2) && i < 1000; i++ {
		if err := dev.WriteAt(ctx, buf, 65536); err != nil {
			t.Fatal(err)
		}
	}
	if !vol.Faulty(2) {
		t.Fatal("replica c never failed")
	}
	for _, tc := range []struct {
		metric string
		want   string
	}{
		{"quorum_volume_bytes_total", `quorum_volume_bytes_total{op="read",volume="vol1"} 8192`},
		{"quorum_volume_requests_total", `quorum_volume_requests_total{op="read",volume="vol1"} 1`},
		{"quorum_events_total", `quorum_events_total{event="REPORT_BAD",op="write",volume="vol1"}`},
		{"quorum_replica_state", `quorum_replica_state{replica="` + ps[2] + `",state="faulty",volume="vol1"} 1`},
		{"quorum_replica_state", `quorum_replica_state{replica="` + ps[0] + `",state="healthy",volume="vol1"} 1`},
		{"quorum_replica_out_of_sync_bytes", `quorum_replica_out_of_sync_bytes{replica="` + ps[2] + `",volume="vol1"} 65536`},
		{"quorum_volume_request_seconds", `quorum_volume_request_seconds_count{op="read",volume="vol1"} 1`},
	} {
		text, err := gatherText(reg, tc.metric)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(text, tc.want) {
			t.Errorf("%s lacks %q:\n%s", tc.metric, tc.want, text)
		}
	}
	if err := vol.Close(ctx); err != nil {
		t.Fatal(err)
	}
	m.Remove()
	if n, err := testutil.GatherAndCount(reg, "quorum_replica_state", "quorum_volume_bytes_total"); err != nil || n != 0 {
		t.Errorf("%d series left after Remove (%v)", n, err)
	}
}

// gatherText renders one family in the text exposition format, as a
// scrape shows it.
func gatherText(reg *prometheus.Registry, name string) (string, error) {
	mfs, err := reg.Gather()
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, mf := range mfs {
		if mf.GetName() == name {
			if _, err := expfmt.MetricFamilyToText(&b, mf); err != nil {
				return "", err
			}
		}
	}
	return b.String(), nil
}
