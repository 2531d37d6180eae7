package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/alignbuf"
	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

// server is a running `quorumctl serve`, possibly inside a network
// namespace.
type server struct {
	*daemon
	addr string
}

// serve starts quorumctl serve (prefixed by wrap, e.g. ip netns exec)
// and waits for the address it listens on.
func serve(t *testing.T, wrap []string, args ...string) *server {
	t.Helper()
	s := &server{}
	s.daemon, s.addr = startDaemon(t, append(append(wrap, bin, "serve"), args...)...)
	return s
}

// stop ends the server with SIGTERM and expects a clean exit.
func (s *server) stop() {
	s.t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		if s.err != nil {
			s.t.Fatalf("serve exited with %v\n%s", s.err, s.logs())
		}
	case <-time.After(60 * time.Second):
		s.t.Fatalf("serve did not stop within 60s\n%s", s.logs())
	}
}

// kill ends the server with SIGKILL, as a crash of its machine would.
func (s *server) kill() {
	s.cmd.Process.Kill()
	<-s.exited
}

func (s *server) uri(name string) string { return "nbd://" + s.addr + "/" + name }

// TestNBDReplicaServerKilled: a 3-replica device, one replica local and
// two behind replica servers; fio writes and verifies while one server
// is killed with SIGKILL and stays dead longer than --nbd-timeout (the
// writes wait for it that long, then leave it out), then is restarted.
// fio sees no error, the replica comes back and resyncs, and the
// replicas end identical.
func TestNBDReplicaServerKilled(t *testing.T) {
	v := startNBDDevice(t, "512M", "5s")
	wait := fioVerify(t, v.a.dev, "256M")
	time.Sleep(time.Second)
	v.sc.kill()
	waitChild(t, v.dir, v.ps[0], 2, "faulty", 15*time.Second)
	time.Sleep(time.Second)
	v.restartC(t)
	wait()
	waitChild(t, v.dir, v.ps[0], 2, "healthy", 60*time.Second)
	if !strings.Contains(v.a.logs(), `"event":"REPORT_BAD"`) {
		t.Errorf("no REPORT_BAD for the lost replica in the log")
	}
	v.detach(t)
}

// TestNBDReplicaServerRestarted: as TestNBDReplicaServerKilled, but the
// killed server is back 500ms later, well within --nbd-timeout, as in a
// rolling upgrade of the nodes' data paths. The replica is never left
// out: no REPORT_BAD, the client logs the loss and the reconnect, fio
// sees no error and the replicas end identical.
func TestNBDReplicaServerRestarted(t *testing.T) {
	v := startNBDDevice(t, "256M", "10s")
	wait := fioVerify(t, v.a.dev, "64M")
	time.Sleep(time.Second)
	v.sc.kill()
	time.Sleep(500 * time.Millisecond)
	v.restartC(t)
	wait()
	if st := status(t, v.dir, v.ps[0]); st[2].State != "healthy" {
		t.Errorf("replica c after a restart within the timeout: %+v", st[2])
	}
	logs := v.a.logs()
	if strings.Contains(logs, `"event":"REPORT_BAD"`) {
		t.Errorf("a restart within the timeout left the replica out:\n%s", logs)
	}
	if !strings.Contains(logs, "connection lost") || !strings.Contains(logs, "reconnected") {
		t.Errorf("the log does not show the loss and the reconnect:\n%s", logs)
	}
	v.detach(t)
}

// nbdDevice is a device over three replicas: ps[0] local, ps[1] and
// ps[2] each behind its own quorumctl serve, sb and sc.
type nbdDevice struct {
	dir    string
	ps     []string
	sb, sc *server
	a      *attached
}

// startNBDDevice creates the replicas with size bytes each, serves
// b and c, and attaches them with --nbd-timeout timeout.
func startNBDDevice(t *testing.T, size, timeout string) *nbdDevice {
	t.Helper()
	v := &nbdDevice{dir: kernelTest(t, "fio")}
	v.ps = replicas(t, v.dir, size, "a.img", "b.img", "c.img")
	v.sb = serve(t, nil, "--listen", "127.0.0.1:0", "--export", "b="+v.ps[1])
	v.sc = serve(t, nil, "--listen", "127.0.0.1:0", "--export", "c="+v.ps[2])
	v.a = attach(t, v.dir, "--epoch", "1", "--probe-interval", "200ms", "--nbd-timeout", timeout, v.ps[0], v.sb.uri("b"), v.sc.uri("c"))
	return v
}

// restartC serves replica c again, on the address sc had.
func (v *nbdDevice) restartC(t *testing.T) {
	t.Helper()
	v.sc = serve(t, nil, "--listen", v.sc.addr, "--export", "c="+v.ps[2])
}

// detach stops the device and both servers and expects the replicas
// identical.
func (v *nbdDevice) detach(t *testing.T) {
	t.Helper()
	v.a.stop(syscall.SIGTERM)
	v.sb.stop()
	v.sc.stop()
	assertIdentical(t, v.ps...)
}

// netns is a network namespace joined to this one by a veth pair, for
// a replica server on its own "machine".
type netns struct {
	name, hostIf, nsIf, hostIP, nsIP string
}

func newNetns(t *testing.T) *netns {
	t.Helper()
	testutil.RequireTools(t, "ip")
	id := make([]byte, 3)
	rand.Read(id)
	suffix := hex.EncodeToString(id)
	n := &netns{name: "qtest-" + suffix, hostIf: "qh" + suffix, nsIf: "qn" + suffix,
		hostIP: fmt.Sprintf("10.%d.%d.1", 100+int(id[0])%100, id[1]), nsIP: fmt.Sprintf("10.%d.%d.2", 100+int(id[0])%100, id[1])}
	t.Cleanup(func() {
		// Processes in the namespace are the tests' own and ended by
		// their own cleanups, which run first; deleting the namespace
		// removes both ends of the veth pair.
		exec.Command("ip", "netns", "del", n.name).Run()
	})
	for _, args := range [][]string{
		{"netns", "add", n.name},
		{"link", "add", n.hostIf, "type", "veth", "peer", "name", n.nsIf},
		{"link", "set", n.nsIf, "netns", n.name},
		{"addr", "add", n.hostIP + "/30", "dev", n.hostIf},
		{"link", "set", n.hostIf, "up"},
		{"-n", n.name, "addr", "add", n.nsIP + "/30", "dev", n.nsIf},
		{"-n", n.name, "link", "set", n.nsIf, "up"},
		{"-n", n.name, "link", "set", "lo", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return n
}

// link takes the namespace's end of the veth pair down or up: packets
// stop (or flow again) with no connection told.
func (n *netns) link(t *testing.T, state string) {
	t.Helper()
	if out, err := exec.Command("ip", "-n", n.name, "link", "set", n.nsIf, state).CombinedOutput(); err != nil {
		t.Fatalf("ip link set %s %s: %v\n%s", n.nsIf, state, err, out)
	}
}

// TestNBDReplicaCutOff: as TestNBDReplicaServerKilled, but the replica
// server runs in its own network namespace and its link is cut and
// restored: requests in flight time out rather than fail.
func TestNBDReplicaCutOff(t *testing.T) {
	dir := kernelTest(t, "fio")
	ps := replicas(t, dir, "512M", "a.img", "b.img", "c.img")
	ns := newNetns(t)
	sb := serve(t, nil, "--listen", "127.0.0.1:0", "--export", "b="+ps[1])
	sc := serve(t, []string{"ip", "netns", "exec", ns.name}, "--listen", ns.nsIP+":10809", "--export", "c="+ps[2])
	a := attach(t, dir, "--epoch", "1", "--probe-interval", "200ms", "--nbd-timeout", "2s", ps[0], sb.uri("b"), sc.uri("c"))
	wait := fioVerify(t, a.dev, "256M")
	time.Sleep(time.Second)
	ns.link(t, "down")
	waitChild(t, dir, ps[0], 2, "faulty", 15*time.Second)
	time.Sleep(2 * time.Second)
	ns.link(t, "up")
	wait()
	waitChild(t, dir, ps[0], 2, "healthy", 60*time.Second)
	a.stop(syscall.SIGTERM)
	sb.stop()
	sc.stop()
	assertIdentical(t, ps...)
}

// ddDirect writes count 4 KiB blocks of pattern b at block seek of dev,
// bypassing the page cache; it returns dd's error.
func ddDirect(dev string, b byte, seek, count int) error {
	f, err := os.OpenFile(dev, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := alignbuf.Make(4096*count, 4096)
	for i := range buf {
		buf[i] = b
	}
	if _, err := f.WriteAt(buf, int64(seek)*4096); err != nil {
		return err
	}
	return f.Sync()
}

// TestNBDFencing: a second attach of the same replicas with a newer
// epoch takes them over: the first holder's writes fail from then on,
// and what the new holder writes is intact on every replica.
func TestNBDFencing(t *testing.T) {
	dir := kernelTest(t)
	ps := replicas(t, dir, "64M", "a.img", "b.img", "c.img")
	s := serve(t, nil, "--listen", "127.0.0.1:0", "--export", "a="+ps[0], "--export", "b="+ps[1], "--export", "c="+ps[2])
	uris := []string{s.uri("a"), s.uri("b"), s.uri("c")}
	old := attach(t, filepath.Join(dir, "old"), append([]string{"--epoch", "1"}, uris...)...)
	if err := ddDirect(old.dev, 1, 0, 16); err != nil {
		t.Fatalf("write as the first holder: %v", err)
	}
	cur := attach(t, filepath.Join(dir, "new"), append([]string{"--epoch", "2"}, uris...)...)
	if err := ddDirect(old.dev, 9, 16, 16); err == nil {
		t.Fatal("the fenced holder could still write")
	}
	if err := ddDirect(cur.dev, 2, 16, 16); err != nil {
		t.Fatalf("write as the new holder: %v", err)
	}
	if !strings.Contains(old.logs(), "fenced") {
		t.Errorf("the old holder's log does not say it was fenced:\n%s", old.logs())
	}
	// The fenced holder cannot mark the replicas clean: it exits 1.
	old.cmd.Process.Signal(syscall.SIGTERM)
	<-old.exited
	cur.stop(syscall.SIGTERM)
	s.stop()
	assertIdentical(t, ps...)
	b, err := os.ReadFile(ps[0])
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[:64<<10], bytes.Repeat([]byte{1}, 64<<10)) || !bytes.Equal(b[64<<10:128<<10], bytes.Repeat([]byte{2}, 64<<10)) {
		t.Fatal("replicas do not hold the first holder's write before the takeover and the new holder's after it")
	}
	s = serve(t, nil, "--listen", "127.0.0.1:0", "--export", "a="+ps[0], "--export", "b="+ps[1], "--export", "c="+ps[2])
	args := []string{"attach", "--state-dir", filepath.Join(dir, "late"), "--epoch", "1", s.uri("a"), s.uri("b"), s.uri("c")}
	if _, e, code := quorumctl(t, args...); code != 1 || !strings.Contains(e, "fenced") {
		t.Fatalf("attach with an old epoch after a restart of the server: exit %d, want 1 and fenced\n%s", code, e)
	}
	s.stop()
}

// TestNBDTLS: a replica server with --tls-dir serves nbds:// replicas
// with client certificates and refuses plain NBD.
func TestNBDTLS(t *testing.T) {
	dir := kernelTest(t)
	certs := filepath.Join(dir, "certs")
	mustQuorumctl(t, "gen-certs", certs)
	ps := replicas(t, dir, "64M", "a.img", "b.img", "c.img")
	s := serve(t, nil, "--listen", "127.0.0.1:0", "--tls-dir", certs, "--export", "b="+ps[1], "--export", "c="+ps[2])
	tlsURI := func(name string) string {
		return "nbds://" + s.addr + "/" + name + "?tls-certificates=" + certs
	}
	if _, e, code := quorumctl(t, "attach", "--state-dir", filepath.Join(dir, "plain"), "--epoch", "1", ps[0], s.uri("b"), s.uri("c")); code == 0 || !strings.Contains(e, "TLS") {
		t.Fatalf("plain NBD to a TLS server: exit %d, want a refusal that names TLS\n%s", code, e)
	}
	a := attach(t, dir, "--epoch", "1", ps[0], tlsURI("b"), tlsURI("c"))
	if err := ddDirect(a.dev, 7, 0, 256); err != nil {
		t.Fatal(err)
	}
	a.stop(syscall.SIGTERM)
	s.stop()
	assertIdentical(t, ps...)
}
