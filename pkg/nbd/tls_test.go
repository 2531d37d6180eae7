package nbd

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// devCA writes a dev CA into a fresh folder.
func devCA(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	if err := GenerateDevCA(dir, []string{"replica-0.example"}); err != nil {
		t.Fatal(err)
	}
	return dir
}

func tlsServer(t *testing.T, dir string, m Backend) *testServer {
	t.Helper()
	cfg, err := ServerTLSDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	return memServer(t, "tcp", m, func(c *ServerConfig) { c.TLS = cfg })
}

func TestGenerateDevCA(t *testing.T) {
	dir := devCA(t)
	for _, f := range []string{CAKeyFile, ServerKeyFile, ClientKeyFile} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v mode %v", f, err, st.Mode())
		}
	}
	if err := GenerateDevCA(dir, nil); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Fatalf("second GenerateDevCA in the same folder: %v", err)
	}
	cfg, err := ServerTLSDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	leaf := cfg.Certificates[0].Leaf
	for _, name := range []string{"replica-0.example", "localhost", "127.0.0.1"} {
		if err := leaf.VerifyHostname(name); err != nil {
			t.Errorf("server certificate: %v", err)
		}
	}
}

func TestTLSMutual(t *testing.T) {
	checkNoGoroutines(t)
	dir := devCA(t)
	m := newMem(1<<20, 512)
	ts := tlsServer(t, dir, m)
	ccfg, err := ClientTLSDir(dir, "")
	if err != nil {
		t.Fatal(err)
	}
	c := dial(t, ts, Config{Export: "mem", TLS: ccfg})
	ctx := context.Background()
	p := pattern(64<<10, 7)
	if err := c.WriteAt(ctx, p, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if err := c.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read over TLS: %v", err)
	}
	if i := c.Info(); !i.Structured || !i.BlockStatus {
		t.Fatalf("negotiated over TLS: %+v", i)
	}
}

func TestTLSServerRefusesPlainClient(t *testing.T) {
	checkNoGoroutines(t)
	dir := devCA(t)
	ts := tlsServer(t, dir, newMem(1<<20, 512))

	// Our client without TLS: told that TLS is required.
	_, err := Dial(context.Background(), Config{Network: ts.Network, Addr: ts.Addr, Export: "mem", Logger: testLogger(t)})
	var oe *OptionError
	if !errors.As(err, &oe) || oe.Reply != RepErrTLSReqd {
		t.Fatalf("plain client: %v, want NBD_REP_ERR_TLS_REQD", err)
	}
	// Every option but STARTTLS and ABORT gets TLS_REQD, GO included.
	r := rawDial(t, ts)
	for _, o := range []Option{OptList, OptStructuredReply, OptInfo, OptGo, OptSetMetaContext, Option(77)} {
		if reps := r.opt(o, nil); reps[0].Type != RepErrTLSReqd {
			t.Errorf("%v before TLS: %v", o, reps[0].Type)
		}
	}
	// EXPORT_NAME cannot be answered with an error: it is hung up on.
	WriteOption(r.nc, OptionRequest{Option: OptExportName, Data: []byte("mem")})
	if !r.closed() {
		t.Error("EXPORT_NAME before TLS was not refused")
	}
}

func TestTLSRefusesForeignCertificates(t *testing.T) {
	checkNoGoroutines(t)
	dir := devCA(t)
	other := devCA(t)
	ts := tlsServer(t, dir, newMem(1<<20, 512))
	dialTLS := func(cfg *tls.Config) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := Dial(ctx, Config{Network: ts.Network, Addr: ts.Addr, Export: "mem", TLS: cfg, Logger: testLogger(t)})
		if err == nil {
			// TLS 1.3 clients learn of a refused certificate at the first
			// read after the handshake; our handshake reads on.
			c.Close()
		}
		return err
	}

	// A client certificate from another CA: the server refuses it.
	foreign, err := ClientTLSConfig(filepath.Join(dir, CAFile), filepath.Join(other, ClientCertFile), filepath.Join(other, ClientKeyFile), "")
	if err != nil {
		t.Fatal(err)
	}
	if err := dialTLS(foreign); err == nil {
		t.Fatal("client certificate from another CA accepted")
	} else {
		t.Logf("foreign client certificate: %v", err)
	}
	// No client certificate at all.
	nocert, _ := ClientTLSDir(dir, "")
	nocert.Certificates = nil
	if err := dialTLS(nocert); err == nil {
		t.Fatal("client without a certificate accepted")
	}
	// A server from another CA: the client refuses it.
	wrongCA, _ := ClientTLSDir(other, "")
	if err := dialTLS(wrongCA); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("server certificate from another CA: %v", err)
	}
	// The name checked must be in the certificate.
	wrongName, _ := ClientTLSDir(dir, "elsewhere.example")
	if err := dialTLS(wrongName); err == nil {
		t.Fatal("server certificate accepted for a name it does not carry")
	}
	// The right credentials still work after all that.
	good, _ := ClientTLSDir(dir, "")
	if err := dialTLS(good); err != nil {
		t.Fatal(err)
	}
}

func TestTLSClientRefusesServerWithoutTLS(t *testing.T) {
	dir := devCA(t)
	ts := memServer(t, "tcp", newMem(1<<20, 512))
	ccfg, _ := ClientTLSDir(dir, "")
	_, err := Dial(context.Background(), Config{Network: ts.Network, Addr: ts.Addr, Export: "mem", TLS: ccfg, Logger: testLogger(t)})
	if err == nil || !strings.Contains(err.Error(), "refused TLS") {
		t.Fatalf("TLS client against a plain server: %v (it must not fall back to clear text)", err)
	}
}
