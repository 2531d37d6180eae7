package holder

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

// mountFUSE makes a FUSE connection by mounting one at a folder under
// dir (nobody answers its INIT; nothing here sends it requests) and
// returns its /dev/fuse descriptor and the mount point.
func mountFUSE(t *testing.T, dir, name string) (int, string) {
	t.Helper()
	mnt := filepath.Join(dir, name)
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("test", mnt, "fuse.test", 0, fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0", fd)); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unix.Unmount(mnt, unix.MNT_DETACH)
		unix.Close(fd)
	})
	return fd, mnt
}

// serve runs a holder at dir/holder-name.sock until the test ends;
// done is closed when it has ended.
func serve(t *testing.T, dir, name string, opts Options) (sock string, done <-chan struct{}) {
	t.Helper()
	sock = Socket(dir, name)
	s, err := Listen(sock, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan struct{})
	go func() {
		defer close(ch)
		if err := s.Serve(ctx); err != nil {
			t.Errorf("holder: %v", err)
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-ch
	})
	return sock, ch
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 5s", what)
		}
	}
}

// TestPutGetDrop: a holder hands back a duplicate of the very open file
// description it was given, lists and drops names, and refuses what is
// not a live FUSE connection.
func TestPutGetDrop(t *testing.T) {
	testutil.RequireKernel(t)
	dir := testutil.KernelDir(t)
	sock, _ := serve(t, dir, "a", Options{})
	fd, _ := mountFUSE(t, dir, "m")
	if err := Put(sock, "vol@0:1", fd); err != nil {
		t.Fatal(err)
	}
	if names, err := List(sock); err != nil || !slices.Equal(names, []string{"vol@0:1"}) {
		t.Fatalf("list: %v %v", names, err)
	}
	// A status flag set on ours shows on the holder's: one description.
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	got, from, err := Get(dir, "vol@0:1")
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(got)
	if from != sock {
		t.Errorf("got it from %s, want %s", from, sock)
	}
	if fl, err := unix.FcntlInt(uintptr(got), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK == 0 {
		t.Errorf("the descriptor from the holder has flags %#x (%v): not the description put", fl, err)
	}
	if _, _, err := Get(dir, "other"); !errors.Is(err, ErrNotHeld) {
		t.Errorf("get of a name nobody holds: %v, want ErrNotHeld", err)
	}
	if err := Drop(dir, "vol@0:1"); err != nil {
		t.Fatal(err)
	}
	if names, _ := List(sock); len(names) != 0 {
		t.Errorf("after drop: %v", names)
	}
	if err := Drop(dir, "vol@0:1"); err != nil {
		t.Errorf("dropping a name again: %v", err)
	}

	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := Put(sock, "null", int(f.Fd())); err == nil {
		t.Error("the holder took /dev/null")
	}
	if err := Put(sock, "with-null", fd, int(f.Fd())); err == nil {
		t.Error("the holder kept /dev/null beside a connection")
	}
	unmounted, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(unmounted)
	if err := Put(sock, "unmounted", unmounted); err == nil {
		t.Error("the holder took a /dev/fuse that was never mounted")
	}
}

// TestKeepsBlockDevice: a block device put beside a connection stays
// open until the name is dropped, so a loop device with autoclear does
// not go meanwhile.
func TestKeepsBlockDevice(t *testing.T) {
	testutil.RequireKernel(t)
	testutil.RequireTools(t, "losetup")
	dir := testutil.KernelDir(t)
	sock, _ := serve(t, dir, "a", Options{})
	fd, _ := mountFUSE(t, dir, "m")
	img := filepath.Join(dir, "img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	dev := strings.TrimSpace(testutil.Run(t, "losetup", "-f", "--show", img))
	bound := func() bool {
		_, err := os.Stat("/sys/block/" + filepath.Base(dev) + "/loop")
		return err == nil
	}
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	if err := Put(sock, "vol", fd, int(f.Fd())); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// Detaching a device that is open only marks it to clear itself on
	// its last close.
	testutil.Run(t, "losetup", "-d", dev)
	time.Sleep(100 * time.Millisecond)
	if !bound() {
		t.Fatal("the loop device went while the holder kept it open")
	}
	if err := Drop(dir, "vol"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the loop device gone once dropped", func() bool { return !bound() })
}

// TestConnectionEndDrops: once a held connection's superblock is gone
// (unmounted), the holder drops it by itself, and an ExitWhenEmpty
// holder then ends.
func TestConnectionEndDrops(t *testing.T) {
	testutil.RequireKernel(t)
	dir := testutil.KernelDir(t)
	var logged []string
	sock, done := serve(t, dir, "a", Options{ExitWhenEmpty: true, Logf: func(f string, a ...any) { logged = append(logged, fmt.Sprintf(f, a...)) }})
	fd1, mnt1 := mountFUSE(t, dir, "m1")
	fd2, _ := mountFUSE(t, dir, "m2")
	if err := Put(sock, "one", fd1); err != nil {
		t.Fatal(err)
	}
	if err := Put(sock, "two", fd2); err != nil {
		t.Fatal(err)
	}
	// Only the holder keeps the first connection once ours is closed.
	unix.Close(fd1)
	if err := unix.Unmount(mnt1, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the ended connection dropped", func() bool {
		names, _ := List(sock)
		return slices.Equal(names, []string{"two"})
	})
	select {
	case <-done:
		t.Fatal("the holder ended while it held a connection")
	default:
	}
	if err := Drop(dir, "two"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("an empty ExitWhenEmpty holder did not end")
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the holder left its socket: %v", err)
	}
	if len(logged) != 1 {
		t.Errorf("log: %q, want one line on the dropped connection", logged)
	}
}

// TestDeadSockets: a socket file nobody listens on is removed when
// holders are looked for, and a new holder takes its place; a live
// holder's socket is not taken over.
func TestDeadSockets(t *testing.T) {
	dir := t.TempDir()
	dead := Socket(dir, "dead")
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: dead, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	live, _ := serve(t, dir, "live", Options{})
	if got := Sockets(dir); !slices.Equal(got, []string{live}) {
		t.Errorf("sockets %v, want only %s", got, live)
	}
	if _, err := os.Stat(dead); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("dead socket file still there: %v", err)
	}
	if _, err := Listen(live, Options{}); err == nil {
		t.Error("a second holder listens at a live one's socket")
	}
	l, err = net.ListenUnix("unixpacket", &net.UnixAddr{Name: dead, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	serve(t, dir, "dead", Options{})
	if !Live(dead) {
		t.Error("a holder started over a dead socket file does not answer")
	}
}

// TestListenMakesItsFolder: the holder container of a data path pod
// starts beside the data path, which may not have made the state folder
// yet.
func TestListenMakesItsFolder(t *testing.T) {
	sock, _ := serve(t, filepath.Join(t.TempDir(), "state", "not-yet"), "a", Options{})
	if !Live(sock) {
		t.Errorf("a holder in a folder it made does not answer at %s", sock)
	}
}

// TestIdleExit: an ExitWhenEmpty holder that is given nothing ends
// after its idle timeout.
func TestIdleExit(t *testing.T) {
	_, done := serve(t, t.TempDir(), "a", Options{ExitWhenEmpty: true, IdleTimeout: 50 * time.Millisecond})
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("an idle holder did not end")
	}
}
