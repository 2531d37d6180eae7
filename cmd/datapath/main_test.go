package main

import (
	"context"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/daemon/daemontest"
	"github.com/quorum-csi/quorum-csi/pkg/datapath"
)

func TestParseFlags(t *testing.T) {
	daemontest.Run(t, []daemontest.Case[options]{
		{
			Name: "defaults", Env: "n1", Args: []string{"--tls-dir", "/tls"},
			Check: func(t *testing.T, o options) {
				a, d := o.agent, o.dp
				if a.Node != "n1" || a.Namespace != "quorum-csi" || a.Listen != ":10809" || a.MetricsAddress != ":9809" ||
					a.LeaseDuration != 30*time.Second || a.RenewInterval != 10*time.Second || a.LocalSocket != "/run/quorum-csi/nbd.sock" {
					t.Errorf("agent defaults: %+v", a)
				}
				if o.socket != "/run/quorum-csi/datapath.sock" || d.StateDir != "/run/quorum-csi/state" || d.Frontend != "auto" ||
					d.RequestTimeout != 10*time.Second || d.ProbeInterval != 2*time.Second || d.ScrubRate != 4<<20 ||
					d.ScrubInterval != 24*time.Hour || o.handoverWait != time.Minute {
					t.Errorf("data path defaults: socket %q, %+v, handover %s", o.socket, d, o.handoverWait)
				}
			},
		},
		{
			Name: "flags",
			Args: []string{"--node-name", "n2", "--namespace", "ns", "--data-dir", "/d", "--listen", "127.0.0.2:0",
				"--advertise-address", "10.0.0.2", "--metrics-address", "0", "--tls-dir", "/tls", "--lease-duration", "3s",
				"--renew-interval", "1s", "--socket", "/s.sock", "--state-dir", "/st", "--frontend", "fuse-loop",
				"--nbd-timeout", "3s", "--scrub-rate", "0", "--handover-timeout", "5s"},
			Check: func(t *testing.T, o options) {
				a, d := o.agent, o.dp
				if a.Node != "n2" || a.Namespace != "ns" || a.DataDir != "/d" || a.Listen != "127.0.0.2:0" || a.AdvertiseAddress != "10.0.0.2" ||
					a.MetricsAddress != "0" || o.tlsDir != "/tls" || a.LeaseDuration != 3*time.Second || a.RenewInterval != time.Second {
					t.Errorf("agent flags: %+v, tls dir %q", a, o.tlsDir)
				}
				if o.socket != "/s.sock" || d.StateDir != "/st" || d.Frontend != "fuse-loop" || d.RequestTimeout != 3*time.Second ||
					d.ScrubRate != 0 || o.handoverWait != 5*time.Second {
					t.Errorf("data path flags: socket %q, %+v", o.socket, d)
				}
			},
		},
		{Name: "no TLS", Env: "n1", WantErr: "--tls-dir is required"},
		{Name: "negative scrub rate", Env: "n1", Args: []string{"--tls-dir", "/tls", "--scrub-rate", "-1"}, WantErr: "--scrub-rate -1"},
		{Name: "zero timeout", Env: "n1", Args: []string{"--tls-dir", "/tls", "--nbd-timeout", "0s"}, WantErr: "must be positive"},
	}, parseFlags, run)
}

// TestProbeInstance: the readiness probe is ready only when its own
// instance answers, not the predecessor still on the socket.
func TestProbeInstance(t *testing.T) {
	dir := t.TempDir()
	svc, err := datapath.New(datapath.Config{StateDir: filepath.Join(dir, "state"), Frontend: "fuse-loop"})
	if err != nil {
		t.Fatal(err)
	}
	svc.TakeOver(context.Background())
	sock := filepath.Join(dir, "datapath.sock")
	l, err := datapath.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: (&datapath.Server{Service: svc, Instance: "old-pod"}).Handler()}
	go hs.Serve(l)
	defer hs.Close()
	for _, tc := range []struct {
		instance string
		want     int
	}{{"old-pod", 0}, {"new-pod", 1}, {"", 0}} {
		var stderr strings.Builder
		if got := run([]string{"probe", "--socket", sock, "--instance", tc.instance}, &stderr); got != tc.want {
			t.Errorf("probe --instance %q: exit %d, want %d (%s)", tc.instance, got, tc.want, stderr.String())
		}
	}
}
