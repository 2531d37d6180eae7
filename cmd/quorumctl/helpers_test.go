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
	"sync"
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

// attached is a running `quorumctl attach`.
type attached struct {
	t        *testing.T
	cmd      *exec.Cmd
	dev      string
	stateDir string
	mu       sync.Mutex
	stderr   bytes.Buffer
	exited   chan struct{} // closed once the process is reaped; then err is set
	err      error
}

// lockedWriter lets the test read stderr while the process writes it.
type lockedWriter struct{ a *attached }

func (w lockedWriter) Write(p []byte) (int, error) {
	w.a.mu.Lock()
	defer w.a.mu.Unlock()
	return w.a.stderr.Write(p)
}

func (a *attached) logs() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.stderr.String()
}

// attach starts quorumctl attach with its state under dir and waits for
// the device path on stdout.
func attach(t *testing.T, dir string, args ...string) *attached {
	t.Helper()
	a := &attached{t: t, exited: make(chan struct{}), stateDir: filepath.Join(dir, "state")}
	a.cmd = exec.Command(bin, append([]string{"attach", "--state-dir", a.stateDir}, args...)...)
	a.cmd.Stderr = lockedWriter{a}
	stdout, err := a.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1)
	br := bufio.NewReader(stdout)
	go func() {
		l, _ := br.ReadString('\n')
		lines <- strings.TrimSpace(l)
		io.Copy(io.Discard, br)
		a.err = a.cmd.Wait()
		close(a.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-a.exited:
			return
		default:
		}
		a.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-a.exited:
		case <-time.After(30 * time.Second):
			t.Errorf("attach ignored SIGTERM for 30s; killing it\n%s", a.logs())
			a.cmd.Process.Kill()
			<-a.exited
		}
	})
	select {
	case l := <-lines:
		if !strings.HasPrefix(l, "/dev/") {
			a.cmd.Process.Kill()
			t.Fatalf("attach printed %q first, want a device path\n%s", l, a.logs())
		}
		a.dev = l
	case <-time.After(30 * time.Second):
		t.Fatalf("attach did not print a device within 30s\n%s", a.logs())
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
		a.t.Fatalf("attach did not exit within 60s\n%s", a.logs())
	}
	// Tests of other packages run at the same time and may get the same
	// loop device right after us: only a binding to our own FUSE file
	// counts.
	if b, err := os.ReadFile("/sys/block/" + filepath.Base(a.dev) + "/loop/backing_file"); err == nil && strings.HasPrefix(string(b), a.stateDir+"/") {
		a.t.Fatalf("%s still bound to %s after detach", a.dev, b)
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
