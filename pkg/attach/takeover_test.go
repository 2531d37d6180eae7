package attach

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/alignbuf"
	"github.com/quorum-csi/quorum-csi/internal/testutil"
	"github.com/quorum-csi/quorum-csi/pkg/attach/holder"
)

// testLog collects what an attach logs, also from its readers after
// the test function returned.
type testLog struct {
	testutil.Log[string]
}

func (l *testLog) logf(format string, args ...any) {
	l.Add(fmt.Sprintf(format, args...))
}

func (l *testLog) has(s string) bool {
	return slices.ContainsFunc(l.All(), func(line string) bool { return strings.Contains(line, s) })
}

func (l *testLog) String() string {
	return strings.Join(l.All(), "\n")
}

// takeoverSetup runs a holder in this process and returns the options
// of attaches that keep their device in it, and a function that stops
// it.
func takeoverSetup(t *testing.T, dir string) (FUSELoopOptions, *testLog, func()) {
	t.Helper()
	holders := filepath.Join(dir, "holders")
	if err := os.Mkdir(holders, 0o700); err != nil {
		t.Fatal(err)
	}
	stop := runHolder(t, holder.Socket(holders, "test"))
	log := &testLog{}
	return FUSELoopOptions{
		StateDir:     filepath.Join(dir, "state"),
		StateFile:    filepath.Join(dir, "state", "fuse-loop-test"),
		HolderDir:    holders,
		HolderSocket: holder.Socket(holders, "test"),
		Logf:         log.logf,
	}, log, stop
}

// runHolder runs a holder in this process at sock until the test ends
// or stop is called.
func runHolder(t *testing.T, sock string) (stop func()) {
	t.Helper()
	h, err := holder.Listen(sock, holder.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.Serve(ctx)
	}()
	stop = func() {
		cancel()
		<-done
	}
	t.Cleanup(stop)
	return stop
}

// served tracks the device currently attached, for a forced detach if
// the test fails.
type served struct{ dev Device }

func (s *served) attach(t *testing.T, vol Volume, opts FUSELoopOptions) Device {
	t.Helper()
	dev, err := AttachFUSELoop(context.Background(), vol, opts)
	if err != nil {
		t.Fatal(err)
	}
	s.dev = dev
	return dev
}

// release hands the served device over.
func (s *served) release(t *testing.T) {
	t.Helper()
	if err := s.dev.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	s.dev = nil
}

// takeBack attaches again and expects the device at path taken back.
func (s *served) takeBack(t *testing.T, vol Volume, opts FUSELoopOptions, path string, log *testLog) Device {
	t.Helper()
	dev := s.attach(t, vol, opts)
	if !dev.TakenBack() || dev.Path() != path {
		t.Fatalf("attach: %s, taken back %v; want %s taken back\n%s", dev.Path(), dev.TakenBack(), path, log)
	}
	return dev
}

func pattern(n int, seed byte) []byte {
	b := alignbuf.Make(n, 0)
	for i := range b {
		b[i] = byte(i%251) ^ seed
	}
	return b
}

// writeAsync writes p at off through f in the background.
func writeAsync(f *os.File, p []byte, off int64) <-chan error {
	ch := make(chan error, 1)
	go func() {
		_, err := f.WriteAt(p, off)
		ch <- err
	}()
	return ch
}

func waitDone(t *testing.T, what string, ch <-chan error) {
	t.Helper()
	select {
	case err := <-ch:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: still waiting after 10s", what)
	}
}

func notDone(t *testing.T, what string, ch <-chan error) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("%s finished (err %v) while no server answered it", what, err)
	case <-time.After(300 * time.Millisecond):
	}
}

// TestFUSELoopTakeover: a released fuse-loop device is taken back by the
// next attach: same device, data intact, and a write issued while no
// server ran completes. A request whose reader died before answering is
// sent again to the next server.
func TestFUSELoopTakeover(t *testing.T) {
	testutil.RequireKernel(t)
	dir := testutil.KernelDir(t)
	opts, log, _ := takeoverSetup(t, dir)
	vol := &memVolume{data: make([]byte, 32<<20), failAt: -1}

	// The reader that takes the first write at 12 MiB drops it, as if
	// its process died; the hook notes the request coming back.
	var dropped, resent atomic.Bool
	testHookServe = func(h inHeader, args []byte) bool {
		if h.Opcode != opWrite {
			return false
		}
		if in, _, _ := parseWriteIn(args); in.Offset != 12<<20 {
			return false
		}
		if h.Unique&uniqueResend != 0 {
			resent.Store(true)
			return false
		}
		return dropped.CompareAndSwap(false, true)
	}
	var s served
	t.Cleanup(func() {
		if s.dev != nil {
			s.dev.ForceDetach()
		}
		testHookServe = nil
	})

	first := s.attach(t, vol, opts)
	if first.TakenBack() {
		t.Fatal("a new device says it was taken back")
	}
	backing := testutil.TrackLoop(t, first.Path())
	if _, err := os.Stat(opts.StateFile); err != nil {
		t.Fatalf("no state file: %v\n%s", err, log)
	}
	// The device's user across the handovers: without one a released
	// device clears itself.
	f, err := os.OpenFile(first.Path(), os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := pattern(1<<20, 1)
	if _, err := f.WriteAt(data, 4<<20); err != nil {
		t.Fatal(err)
	}

	s.release(t)
	late := pattern(4096, 2)
	wrote := writeAsync(f, late, 8<<20)
	notDone(t, "a write after the release", wrote)

	s.takeBack(t, vol, opts, first.Path(), log)
	if !log.has("took back fuse-loop device " + first.Path()) {
		t.Errorf("no takeover logged:\n%s", log)
	}
	waitDone(t, "the write that waited for the second server", wrote)
	got := alignbuf.Make(1<<20, 0)
	if _, err := f.ReadAt(got, 4<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back after the takeover: %v", err)
	}

	dying := pattern(4096, 3)
	wrote = writeAsync(f, dying, 12<<20)
	for deadline := time.Now().Add(10 * time.Second); !dropped.Load(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the write at 12 MiB never reached a reader")
		}
	}
	notDone(t, "a write whose reader died", wrote)
	s.release(t)
	third := s.takeBack(t, vol, opts, first.Path(), log)
	waitDone(t, "the write whose reader died", wrote)
	if !resent.Load() {
		t.Error("the dropped write did not come back marked as resent")
	}
	vol.mu.Lock()
	intact := bytes.Equal(vol.data[4<<20:5<<20], data) && bytes.Equal(vol.data[8<<20:8<<20+4096], late) && bytes.Equal(vol.data[12<<20:12<<20+4096], dying)
	vol.mu.Unlock()
	if !intact {
		t.Fatal("the volume lacks a write made across a handover")
	}

	f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := third.Detach(ctx); err != nil {
		t.Fatal(err)
	}
	s.dev = nil
	if _, err := os.Stat(opts.StateFile); !os.IsNotExist(err) {
		t.Errorf("state file after detach: %v", err)
	}
	if names, err := holder.List(holder.Socket(opts.HolderDir, "test")); err != nil || len(names) != 0 {
		t.Errorf("holder after detach: %v %v", names, err)
	}
	if id, bound := testutil.LoopBacking(first.Path()); bound && id == backing {
		t.Errorf("%s still bound after detach", first.Path())
	}
}

// TestFUSELoopKeptAtRelease: a device made while its holder was away
// (a holder container restarting) is kept at release once the holder is
// back, and taken back by the next attach, instead of dying with the
// process that made it.
func TestFUSELoopKeptAtRelease(t *testing.T) {
	testutil.RequireKernel(t)
	dir := testutil.KernelDir(t)
	opts, log, stopHolder := takeoverSetup(t, dir)
	stopHolder()
	vol := &memVolume{data: make([]byte, 8<<20), failAt: -1}
	var s served
	t.Cleanup(func() {
		if s.dev != nil {
			s.dev.ForceDetach()
		}
	})
	first := s.attach(t, vol, opts)
	testutil.TrackLoop(t, first.Path())
	if !log.has("unless a holder takes it before") {
		t.Fatalf("no word of the device not being kept:\n%s", log)
	}
	f, err := os.OpenFile(first.Path(), os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := pattern(4096, 7)
	if _, err := f.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}

	runHolder(t, opts.HolderSocket) // the holder is back
	s.release(t)
	second := s.takeBack(t, vol, opts, first.Path(), log)
	got := alignbuf.Make(4096, 0)
	if _, err := f.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back after the takeover: %v", err)
	}
	f.Close()
	dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer dcancel()
	if err := second.Detach(dctx); err != nil {
		t.Fatal(err)
	}
	s.dev = nil
}

// TestFUSELoopStateFile: a state file that cannot be read is an error;
// one whose connection no holder keeps is forgotten and a new device
// made, as is one whose device cleared itself after a release.
func TestFUSELoopStateFile(t *testing.T) {
	testutil.RequireKernel(t)
	dir := testutil.KernelDir(t)
	opts, log, stopHolder := takeoverSetup(t, dir)
	vol := &memVolume{data: make([]byte, 8<<20), failAt: -1}
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ content, want string }{
		{`{"version":1,"loop":`, "corrupt"},
		{`{"version":9,"loop":3}`, "version 9"},
		{`{"version":1,"loop":3,"holder":"x","size":8388608,"fuse":{"minor":40,"maxWrite":1048576},"extra":1}`, "corrupt"},
	} {
		os.WriteFile(opts.StateFile, []byte(tc.content), 0o600)
		if _, err := AttachFUSELoop(context.Background(), vol, opts); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("state %s: err %v, want one saying %q", tc.content, err, tc.want)
		}
	}

	var s served
	t.Cleanup(func() {
		if s.dev != nil {
			s.dev.ForceDetach()
		}
	})
	nobody := fuseLoopState{Loop: 3, LoopDevice: 99, LoopInode: 99, Holder: "nobody@0:99", Size: vol.Size(), FUSE: fuseParams{Minor: 40, MaxWrite: 1 << 20}}
	if err := writeFUSELoopState(opts.StateFile, nobody); err != nil {
		t.Fatal(err)
	}
	dev := s.attach(t, vol, opts)
	testutil.TrackLoop(t, dev.Path())
	if dev.TakenBack() || !log.has("cannot take back fuse-loop device /dev/loop3: no holder") {
		t.Fatalf("attach over a state file whose connection nobody keeps: taken back %v\n%s", dev.TakenBack(), log)
	}
	st, err := readFUSELoopState(opts.StateFile)
	if err != nil || st.Loop != int(mustAtoi(t, strings.TrimPrefix(dev.Path(), "/dev/loop"))) {
		t.Fatalf("state file of the new device: %+v %v", st, err)
	}

	// Released with nobody using it, the device stays: the holder keeps
	// it open.
	s.release(t)
	s.takeBack(t, vol, opts, dev.Path(), log)

	// A holder that ends takes the connection and the device with it
	// once nobody uses the device; the next attach makes a new one.
	s.release(t)
	stopHolder()
	backing := testutil.LoopID{Device: st.LoopDevice, Inode: st.LoopInode}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if id, bound := testutil.LoopBacking(dev.Path()); !bound || id != backing {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s stayed after its holder ended", dev.Path())
		}
	}
	dev = s.attach(t, vol, opts)
	testutil.TrackLoop(t, dev.Path())
	if dev.TakenBack() || !log.has("no descriptor holder keeps the FUSE connection of "+dev.Path()) {
		t.Fatalf("attach after the holder ended: taken back %v\n%s", dev.TakenBack(), log)
	}
	if err := dev.Detach(context.Background()); err != nil {
		t.Fatal(err)
	}
	s.dev = nil
}

func mustAtoi(t *testing.T, s string) int64 {
	t.Helper()
	var n int64
	if _, err := fmt.Sscan(s, &n); err != nil {
		t.Fatal(err)
	}
	return n
}
