package main

import (
	"io"
	"strings"
	"testing"
	"time"
)

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name    string
		env     string
		args    []string
		wantErr string
		check   func(t *testing.T, o options)
	}{
		{
			name: "defaults", env: "n1", args: []string{"--tls-dir", "/tls"},
			check: func(t *testing.T, o options) {
				a := o.agent
				if a.Node != "n1" || a.Namespace != "quorum-csi" || a.Listen != ":10809" || a.MetricsAddress != ":9809" ||
					a.LeaseDuration != 30*time.Second || a.RenewInterval != 10*time.Second || a.TLS != nil ||
					a.LocalSocket != "/run/quorum-csi/nbd.sock" {
					t.Errorf("defaults: %+v", a)
				}
				c := o.csi
				if o.csiEndpoint != "unix:///csi/csi.sock" || c.NodeName != "n1" || c.TLSDir != "/tls" || c.LocalSocket != a.LocalSocket ||
					o.kubeletDir != "/var/lib/kubelet" || o.regPath != "" || c.TLSHostname != "localhost" || c.StateDir != "/run/quorum-csi/state" || c.Frontend != "auto" || c.RequestTimeout != 10*time.Second {
					t.Errorf("CSI defaults: endpoint %q, %+v", o.csiEndpoint, c)
				}
			},
		},
		{
			name: "agent alone", env: "n1", args: []string{"--csi-endpoint="},
			check: func(t *testing.T, o options) {
				if o.csiEndpoint != "" || o.tlsDir != "" {
					t.Errorf("agent alone: endpoint %q, tls dir %q", o.csiEndpoint, o.tlsDir)
				}
			},
		},
		{name: "CSI without TLS", env: "n1", wantErr: "need --tls-dir"},
		{
			name: "flags",
			args: []string{"--node-name", "n2", "--namespace", "ns", "--data-dir", "/d", "--listen", "127.0.0.2:0",
				"--advertise-address", "10.0.0.2", "--metrics-address", "0", "--tls-dir", "/tls", "--lease-duration", "3s", "--renew-interval", "1s"},
			check: func(t *testing.T, o options) {
				a := o.agent
				if a.Node != "n2" || a.Namespace != "ns" || a.DataDir != "/d" || a.Listen != "127.0.0.2:0" || a.AdvertiseAddress != "10.0.0.2" ||
					a.MetricsAddress != "0" || o.tlsDir != "/tls" || a.LeaseDuration != 3*time.Second || a.RenewInterval != time.Second {
					t.Errorf("flags: %+v, tls dir %q", a, o.tlsDir)
				}
			},
		},
		{name: "no node name", wantErr: "no node name"},
		{name: "stray argument", env: "n1", args: []string{"extra"}, wantErr: "unexpected arguments"},
		{name: "unknown flag", env: "n1", args: []string{"--bogus"}, wantErr: "bogus"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("NODE_NAME", tc.env)
			o, err := parseFlags(tc.args, io.Discard)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, o)
		})
	}
}

func TestRunRefusesBadCommandLine(t *testing.T) {
	t.Setenv("NODE_NAME", "")
	var stderr strings.Builder
	if code := run(nil, &stderr); code != 2 || !strings.Contains(stderr.String(), "no node name") {
		t.Fatalf("exit %d, stderr %q", code, stderr.String())
	}
}
