package nbd

import (
	"strings"
	"testing"
)

func TestParseURI(t *testing.T) {
	dir := devCA(t)
	for _, tt := range []struct {
		uri     string
		network string
		addr    string
		export  string
		epoch   uint64
		tls     bool
		err     string
	}{
		{uri: "nbd://10.0.0.5/vol", network: "tcp", addr: "10.0.0.5:10809", export: "vol"},
		{uri: "nbd://replica-0:7000/vol@epoch=12", network: "tcp", addr: "replica-0:7000", export: "vol", epoch: 12},
		{uri: "nbd://[::1]:7000/a%20b", network: "tcp", addr: "[::1]:7000", export: "a b"},
		{uri: "nbd://host/", network: "tcp", addr: "host:10809", export: ""},
		{uri: "nbd+unix:///vol?socket=/run/r.sock", network: "unix", addr: "/run/r.sock", export: "vol"},
		{uri: "nbds://host:7000/vol@epoch=3?tls-certificates=" + dir, network: "tcp", addr: "host:7000", export: "vol", epoch: 3, tls: true},
		{uri: "nbds+unix:///vol?socket=/s&tls-certificates=" + dir + "&tls-hostname=localhost", network: "unix", addr: "/s", export: "vol", tls: true},
		{uri: "http://host/vol", err: "scheme"},
		{uri: "nbds://host/vol", err: "tls-certificates"},
		{uri: "nbd://host/vol?tls-certificates=" + dir, err: "need the nbds scheme"},
		{uri: "nbd://host/vol?epoch=3", err: "unknown parameter"},
		{uri: "nbd://host/vol@epoch=x", err: "epoch"},
		{uri: "nbd+unix:///vol", err: "socket"},
		{uri: "nbd+unix://host/vol?socket=/s", err: "no host"},
		{uri: "nbd:///vol", err: "needs a host"},
		{uri: "nbds+unix:///vol?socket=/s&tls-certificates=" + dir, err: "tls-hostname"},
		{uri: "nbds://host/vol?tls-certificates=/nonexistent", err: "TLS CA"},
	} {
		cfg, err := ParseURI(tt.uri)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("ParseURI(%q) = %v, want an error about %q", tt.uri, err, tt.err)
			}
			continue
		}
		if err != nil || cfg.Network != tt.network || cfg.Addr != tt.addr || cfg.Export != tt.export || cfg.Epoch != tt.epoch || (cfg.TLS != nil) != tt.tls {
			t.Errorf("ParseURI(%q) = %+v, %v", tt.uri, cfg, err)
		}
		if !IsURI(tt.uri) {
			t.Errorf("IsURI(%q) = false", tt.uri)
		}
	}
	if IsURI("/var/lib/replica.img") || IsURI("nbd.img") {
		t.Error("a path taken for a URI")
	}
}
