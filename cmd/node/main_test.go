package main

import (
	"io"
	"strings"
	"testing"
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
				c := o.csi
				if o.csiEndpoint != "unix:///csi/csi.sock" || c.NodeName != "n1" || c.TLSDir != "/tls" || c.LocalSocket != "/run/quorum-csi/nbd.sock" ||
					o.kubeletDir != "/var/lib/kubelet" || o.regPath != "" || c.TLSHostname != "localhost" || o.socket != "/run/quorum-csi/datapath.sock" {
					t.Errorf("defaults: endpoint %q, socket %q, %+v", o.csiEndpoint, o.socket, c)
				}
			},
		},
		{
			name: "flags",
			args: []string{"--node-name", "n2", "--tls-dir", "/tls", "--local-socket", "/l.sock", "--datapath-socket", "/d.sock",
				"--csi-endpoint", "unix:///c.sock", "--kubelet-dir", "", "--tls-hostname", "h"},
			check: func(t *testing.T, o options) {
				c := o.csi
				if c.NodeName != "n2" || c.LocalSocket != "/l.sock" || o.socket != "/d.sock" || o.csiEndpoint != "unix:///c.sock" || o.kubeletDir != "" || c.TLSHostname != "h" {
					t.Errorf("flags: %+v, socket %q, endpoint %q", c, o.socket, o.csiEndpoint)
				}
			},
		},
		{name: "no TLS", env: "n1", wantErr: "--tls-dir is required"},
		{name: "no CSI endpoint", env: "n1", args: []string{"--tls-dir", "/tls", "--csi-endpoint="}, wantErr: "--csi-endpoint is required"},
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
