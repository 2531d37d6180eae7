// Package testutil holds what tests on real kernel parts share: gates for
// root, devices and tools that skip on a laptop but fail in CI, and checks
// that a test left no loop device or mount behind; and what any test uses
// to collect what its goroutines report (SyncBuffer, Log).
package testutil

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
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
		for _, l := range untrack(t) {
			if id, ok := LoopBacking(l.dev); ok && id == l.id {
				t.Errorf("test left a loop device behind: %s", l.dev)
				exec.Command("losetup", "-d", l.dev).Run()
			}
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

// SyncBuffer collects what a process or goroutine writes while the test
// reads it.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Log collects what goroutines report (events, states, log lines) while
// the test reads it.
type Log[T any] struct {
	mu   sync.Mutex
	vals []T
}

// Add appends v.
func (l *Log[T]) Add(v T) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.vals = append(l.vals, v)
}

// All returns a copy of what was added so far, in order.
func (l *Log[T]) All() []T {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]T(nil), l.vals...)
}

// Reset forgets what was added.
func (l *Log[T]) Reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.vals = nil
}

// LoopID names a loop device's backing file: its device and inode
// numbers (LOOP_GET_STATUS64's lo_device and lo_inode).
type LoopID struct{ Device, Inode uint64 }

// LoopBacking returns the backing file of the loop device dev, false if
// it has none.
func LoopBacking(dev string) (LoopID, bool) {
	f, err := os.Open(dev)
	if err != nil {
		return LoopID{}, false
	}
	defer f.Close()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		return LoopID{}, false
	}
	return LoopID{info.Device, info.Inode}, true
}

type trackedLoop struct {
	dev string
	id  LoopID
}

var (
	trackedMu sync.Mutex
	tracked   = map[testing.TB][]trackedLoop{}
)

// TrackLoop adds the loop device dev, as it is bound now, to what
// KernelDir's check covers (call KernelDir first): fuse-loop devices sit
// on a file whose mount is detached, so their backing file is not under
// the test's folder. The device must be gone, or bound to another file,
// when the test ends.
func TrackLoop(t testing.TB, dev string) LoopID {
	t.Helper()
	id, ok := LoopBacking(dev)
	if !ok {
		t.Fatalf("%s has no backing file", dev)
	}
	trackedMu.Lock()
	defer trackedMu.Unlock()
	tracked[t] = append(tracked[t], trackedLoop{dev, id})
	return id
}

func untrack(t testing.TB) []trackedLoop {
	trackedMu.Lock()
	defer trackedMu.Unlock()
	l := tracked[t]
	delete(tracked, t)
	return l
}
