// Package testutil holds what tests on real kernel parts share: gates for
// root, devices and tools that skip on a laptop but fail in CI, and checks
// that a test left no loop device or mount behind.
package testutil

import (
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// InCI reports whether missing prerequisites must fail instead of skip.
// .ci/run sets QUORUM_CI=1.
func InCI() bool { return os.Getenv("QUORUM_CI") == "1" }

// Unavailable skips the test for reason, or fails it under QUORUM_CI=1.
func Unavailable(t testing.TB, reason string) {
	t.Helper()
	if InCI() {
		t.Fatalf("QUORUM_CI=1 but %s", reason)
	}
	t.Skipf("skipped: %s (set QUORUM_CI=1 to make this a failure)", reason)
}

// RequireKernel needs root, /dev/fuse and /dev/loop-control.
func RequireKernel(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root for loop devices and FUSE mounts")
	}
	for _, dev := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(dev); err != nil {
			Unavailable(t, "needs "+dev)
		}
	}
}

// RequireTools needs the named programs on PATH.
func RequireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			Unavailable(t, "needs "+tool+" on PATH")
		}
	}
}

// Run runs a command and fails the test with its output on error.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// KernelDir returns a fresh temporary folder for a test's replicas and
// mount points. When the test ends, any loop device backed by a file under
// it and any mount under it is an error; they are torn down (mounts
// lazily, loop devices detached) so that a failing test still leaves the
// machine clean.
func KernelDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "quorum-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		mounts, loops := leftovers(dir)
		for _, m := range mounts {
			t.Errorf("test left a mount behind: %s", m)
			exec.Command("umount", "-l", m).Run()
		}
		for _, l := range loops {
			t.Errorf("test left a loop device behind: %s", l)
			exec.Command("losetup", "-d", l).Run()
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove test folder: %v", err)
		}
	})
	return dir
}

// leftovers lists mount points under dir (deepest first) and loop devices
// whose backing file is under dir.
func leftovers(dir string) (mounts, loops []string) {
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
				mounts = append([]string{f[4]}, mounts...)
			}
		}
	}
	if out, err := exec.Command("losetup", "-a", "-n", "-O", "NAME,BACK-FILE").Output(); err == nil {
		for _, l := range strings.Split(string(out), "\n") {
			if f := strings.Fields(l); len(f) == 2 && strings.HasPrefix(f[1], dir+"/") {
				loops = append(loops, f[0])
			}
		}
	}
	return mounts, loops
}

// LogWriter sends what is written to it to t's log, a line a write.
func LogWriter(t testing.TB) io.Writer { return logWriter{t} }

type logWriter struct{ t testing.TB }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
