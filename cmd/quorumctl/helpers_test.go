package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

// bin is the quorumctl binary under test, built once by TestMain.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "quorumctl-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "quorumctl")
	out, err := exec.Command("go", "build", "-race", "-o", bin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build quorumctl: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// quorumctl runs a short subcommand and returns its outputs and status.
func quorumctl(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return o.String(), e.String(), ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run quorumctl %v: %v", args, err)
	}
	return o.String(), e.String(), 0
}

func mustQuorumctl(t *testing.T, args ...string) string {
	t.Helper()
	o, e, code := quorumctl(t, args...)
	if code != 0 {
		t.Fatalf("quorumctl %s: exit %d\n%s%s", strings.Join(args, " "), code, o, e)
	}
	return o
}

// replicas creates a volume's replica images in dir.
func replicas(t *testing.T, dir, size string, names ...string) []string {
	t.Helper()
	var ps []string
	for _, n := range names {
		ps = append(ps, filepath.Join(dir, n))
	}
	mustQuorumctl(t, append([]string{"create", "--size", size}, ps...)...)
	return ps
}

// daemon is a long-running quorumctl (attach, serve) that reports on the
// first line of its stdout (a device, an address) once it is ready.
type daemon struct {
	t      *testing.T
	cmd    *exec.Cmd
	stderr testutil.SyncBuffer
	exited chan struct{} // closed once the process is reaped; then err is set
	err    error
}

func (d *daemon) logs() string { return d.stderr.String() }

// startDaemon runs argv and returns it with its first stdout line. The
// test's cleanup stops it with SIGTERM, and kills it (failing the test)
// if it ignores that for 30s.
func startDaemon(t *testing.T, argv ...string) (*daemon, string) {
	t.Helper()
	d := &daemon{t: t, exited: make(chan struct{})}
	d.cmd = exec.Command(argv[0], argv[1:]...)
	// The race detector sleeps a second before a process exits, which
	// the handover tests would count as the stall of a handover.
	d.cmd.Env = append(os.Environ(), "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	d.cmd.Stderr = &d.stderr
	stdout, err := d.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1)
	br := bufio.NewReader(stdout)
	go func() {
		l, _ := br.ReadString('\n')
		lines <- strings.TrimSpace(l)
		io.Copy(io.Discard, br)
		d.err = d.cmd.Wait()
		close(d.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-d.exited:
			return
		default:
		}
		d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.exited:
		case <-time.After(30 * time.Second):
			t.Errorf("%s ignored SIGTERM for 30s; killing it\n%s", strings.Join(argv, " "), d.logs())
			d.cmd.Process.Kill()
			<-d.exited
		}
	})
	select {
	case l := <-lines:
		if l == "" {
			<-d.exited
			t.Fatalf("%s exited before it was ready: %v\n%s", strings.Join(argv, " "), d.err, d.logs())
		}
		return d, l
	case <-time.After(30 * time.Second):
		d.cmd.Process.Kill()
		t.Fatalf("%s printed nothing within 30s\n%s", strings.Join(argv, " "), d.logs())
	}
	panic("unreachable")
}

// attached is a running `quorumctl attach`.
type attached struct {
	*daemon
	dev      string
	stateDir string
	backing  testutil.LoopID // the device's backing file, for a loop device
}

// attach starts quorumctl attach with its state under dir and waits for
// the device path on stdout.
func attach(t *testing.T, dir string, args ...string) *attached {
	t.Helper()
	a := &attached{stateDir: filepath.Join(dir, "state")}
	a.daemon, a.dev = startDaemon(t, append([]string{bin, "attach", "--state-dir", a.stateDir}, args...)...)
	if !strings.HasPrefix(a.dev, "/dev/") {
		a.cmd.Process.Kill()
		t.Fatalf("attach printed %q first, want a device path\n%s", a.dev, a.logs())
	}
	if strings.HasPrefix(a.dev, "/dev/loop") {
		a.backing = testutil.TrackLoop(t, a.dev)
	}
	return a
}

// stop sends sig and expects a clean exit.
func (a *attached) stop(sig syscall.Signal) {
	a.t.Helper()
	a.cmd.Process.Signal(sig)
	a.wait()
}

// wait expects the process to exit cleanly, the device gone.
func (a *attached) wait() {
	a.t.Helper()
	select {
	case <-a.exited:
		if a.err != nil {
			a.t.Fatalf("attach exited with %v\n%s", a.err, a.logs())
		}
	case <-time.After(60 * time.Second):
		// SIGQUIT makes the Go runtime print every goroutine to the
		// logs: where the attach hangs.
		a.cmd.Process.Signal(syscall.SIGQUIT)
		time.Sleep(3 * time.Second)
		a.t.Fatalf("attach did not exit within 60s\n%s", a.logs())
	}
	// Tests of other packages run at the same time and may get the same
	// loop device right after us: only a binding to our own FUSE file
	// counts.
	if id, ok := testutil.LoopBacking(a.dev); ok && id == a.backing {
		a.t.Fatalf("%s still bound to its FUSE file after detach", a.dev)
	}
}

func kernelTest(t *testing.T, tools ...string) string {
	t.Helper()
	testutil.RequireKernel(t)
	testutil.RequireTools(t, append([]string{"losetup"}, tools...)...)
	return testutil.KernelDir(t)
}

func sha(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// assertIdentical runs quorumctl check and expects identical replicas.
func assertIdentical(t *testing.T, ps ...string) {
	t.Helper()
	o, e, code := quorumctl(t, append([]string{"check"}, ps...)...)
	if code != 0 {
		t.Fatalf("quorumctl check: exit %d\n%s%s", code, o, e)
	}
}

// fioVerify starts fio writing and verifying through dev; wait returns
// its terse result line and fails the test unless fio reports 0 errors.
func fioVerify(t *testing.T, dev, size string) (wait func() string) {
	t.Helper()
	fio := exec.Command("fio", "--name=nbd", "--filename="+dev, "--ioengine=libaio", "--direct=1",
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--size="+size, "--verify=crc32c", "--do_verify=1",
		"--verify_fatal=1", "--output-format=terse", "--terse-version=3")
	var out, errb bytes.Buffer
	fio.Stdout, fio.Stderr = &out, &errb
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if fio.ProcessState == nil {
			fio.Process.Kill()
			fio.Wait()
		}
	})
	return func() string {
		t.Helper()
		if err := fio.Wait(); err != nil {
			t.Fatalf("fio: %v\n%s%s", err, out.String(), errb.String())
		}
		res := out.String()
		if f := strings.Split(res, ";"); len(f) < 5 || f[4] != "0" {
			t.Fatalf("fio reported errors: %s", res)
		}
		return res
	}
}

// waitChild polls the attach's status until child i is in state.
func waitChild(t *testing.T, dir, local string, i int, state string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		st := status(t, dir, local)
		if st[i].State == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica %d did not become %s within %s: %+v", i, state, within, st)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
