package main

import (
	"testing"

	"github.com/quorum-csi/quorum-csi/internal/daemon/daemontest"
)

func TestParseFlags(t *testing.T) {
	daemontest.Run(t, []daemontest.Case[options]{
		{
			Name: "defaults", Env: "n1", Args: []string{"--tls-dir", "/tls"},
			Check: func(t *testing.T, o options) {
				c := o.csi
				if o.csiEndpoint != "unix:///csi/csi.sock" || c.NodeName != "n1" || c.TLSDir != "/tls" || c.LocalSocket != "/run/quorum-csi/nbd.sock" ||
					o.kubeletDir != "/var/lib/kubelet" || o.regPath != "" || c.TLSHostname != "localhost" || o.socket != "/run/quorum-csi/datapath.sock" {
					t.Errorf("defaults: endpoint %q, socket %q, %+v", o.csiEndpoint, o.socket, c)
				}
			},
		},
		{
			Name: "flags",
			Args: []string{"--node-name", "n2", "--tls-dir", "/tls", "--local-socket", "/l.sock", "--datapath-socket", "/d.sock",
				"--csi-endpoint", "unix:///c.sock", "--kubelet-dir", "", "--tls-hostname", "h"},
			Check: func(t *testing.T, o options) {
				c := o.csi
				if c.NodeName != "n2" || c.LocalSocket != "/l.sock" || o.socket != "/d.sock" || o.csiEndpoint != "unix:///c.sock" || o.kubeletDir != "" || c.TLSHostname != "h" {
					t.Errorf("flags: %+v, socket %q, endpoint %q", c, o.socket, o.csiEndpoint)
				}
			},
		},
		{Name: "no TLS", Env: "n1", WantErr: "--tls-dir is required"},
		{Name: "no CSI endpoint", Env: "n1", Args: []string{"--tls-dir", "/tls", "--csi-endpoint="}, WantErr: "--csi-endpoint is required"},
	}, parseFlags, run)
}
