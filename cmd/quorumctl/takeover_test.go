package main

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

// holderPID returns the process of the descriptor holder that attach
// started in stateDir (its socket's peer), 0 if none answers there.
func holderPID(t *testing.T, stateDir string) int {
	t.Helper()
	c, err := net.Dial("unixpacket", filepath.Join(stateDir, "holder-quorumctl.sock"))
	if err != nil {
		return 0
	}
	defer c.Close()
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) { cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if err != nil {
		t.Fatal(err)
	}
	return int(cred.Pid)
}

// running reports whether process pid runs (a zombie has ended).
func running(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z")
}

// killHolderAtEnd kills the holder pid when the test ends if it still
// runs: a test that fails half way must not leave it keeping a device.
func killHolderAtEnd(t *testing.T, pid int) {
	t.Cleanup(func() {
		if pid > 0 && running(pid) {
			t.Errorf("the descriptor holder %d still runs; killing it", pid)
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
}

// dmesgSince returns the kernel log lines that came after the line
// last (all of them if last has rotated out).
func dmesgSince(t *testing.T, last string) []string {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(testutil.Run(t, "dmesg")), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if lines[i] == last {
			return lines[i+1:]
		}
	}
	return lines
}

func lastDmesg(t *testing.T) string {
	l := dmesgSince(t, "")
	return l[len(l)-1]
}

// fioJob is what the takeover tests read of fio's JSON report.
type fioJob struct {
	Error int `json:"error"`
	Write struct {
		IOs   int64 `json:"total_ios"`
		ClatN struct {
			Max float64 `json:"max"`
		} `json:"clat_ns"`
	} `json:"write"`
}

// TestFUSETakeoverAfterKill: quorumctl attach is killed with SIGKILL while
// fio writes and verifies a file on ext4 on its fuse-loop device; the
// same attach command, run again, takes the device back. fio sees no
// error, the filesystem stays read-write with no error in the kernel
// log, the replicas end identical, and the holder that kept the FUSE
// connection meanwhile is gone after the detach.
func TestFUSETakeoverAfterKill(t *testing.T) {
	takeover(t, false, func(a *attached) {
		a.cmd.Process.Kill()
		<-a.exited
	})
}

// TestFUSEHandover: the same with a planned handover: on SIGUSR1 the
// attach answers what it holds, leaves the device to the next attach and
// exits 0; nothing needs to be resent.
func TestFUSEHandover(t *testing.T) {
	takeover(t, true, func(a *attached) {
		a.cmd.Process.Signal(syscall.SIGUSR1)
		select {
		case <-a.exited:
		case <-time.After(60 * time.Second):
			t.Fatalf("attach did not exit within 60s of SIGUSR1\n%s", a.logs())
		}
		if a.err != nil || !strings.Contains(a.logs(), `"msg":"released"`) {
			t.Fatalf("attach after SIGUSR1: %v\n%s", a.err, a.logs())
		}
	})
}

// takeover runs fio on ext4 on a fuse-loop device, stops the attach
// with stop while fio writes, and has a new attach take the device back;
// planned: the stop answered every request it had taken.
func takeover(t *testing.T, planned bool, stop func(*attached)) {
	dir := kernelTest(t, "fio", "mkfs.ext4", "mount", "umount", "findmnt", "dmesg")
	ps := replicas(t, dir, "1G", "a.img", "b.img", "c.img")
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o700)
	since := lastDmesg(t)
	args := append([]string{"--frontend", "fuse-loop"}, ps...)

	a := attach(t, dir, args...)
	holder := holderPID(t, a.stateDir)
	if holder == 0 {
		t.Fatalf("attach started no descriptor holder\n%s", a.logs())
	}
	killHolderAtEnd(t, holder)
	testutil.Run(t, "mkfs.ext4", "-q", a.dev)
	testutil.Run(t, "mount", a.dev, mnt)
	mounted := true
	t.Cleanup(func() {
		if mounted {
			exec.Command("umount", "-l", mnt).Run()
		}
	})
	fio := exec.Command("fio", "--name=takeover", "--filename="+filepath.Join(mnt, "fio.dat"), "--size=192M",
		"--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json")
	var fioOut, fioErr bytes.Buffer
	fio.Stdout, fio.Stderr = &fioOut, &fioErr
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	fioDone := make(chan struct{})
	var fioRes error
	go func() {
		fioRes = fio.Wait()
		close(fioDone)
	}()
	t.Cleanup(func() {
		fio.Process.Kill()
		<-fioDone
	})
	time.Sleep(3 * time.Second)
	select {
	case <-fioDone:
		t.Fatalf("fio ended (%v) before the attach was stopped; make its job longer\n%s", fioRes, fioOut.String())
	default:
	}

	stopping := time.Now()
	stop(a)
	stopped := time.Now()

	b := attach(t, dir, args...)
	defer func() { t.Log(b.logs()) }()
	t.Logf("the first attach ended %s after it was signalled; the second printed its device %s later",
		stopped.Sub(stopping).Round(time.Millisecond), time.Since(stopped).Round(time.Millisecond))
	if b.dev != a.dev {
		t.Fatalf("second attach: %s, want %s taken back\n%s", b.dev, a.dev, b.logs())
	}
	waitFor(t, b, "took back fuse-loop device "+a.dev)
	<-fioDone
	if fioRes != nil {
		t.Fatalf("fio: %v\n%s%s", fioRes, fioOut.String(), fioErr.String())
	}
	var rep struct{ Jobs []fioJob }
	if err := json.Unmarshal(fioOut.Bytes(), &rep); err != nil || len(rep.Jobs) != 1 {
		t.Fatalf("fio report: %v\n%s", err, fioOut.String())
	}
	if job := rep.Jobs[0]; job.Error != 0 || job.Write.IOs == 0 {
		t.Fatalf("fio: error %d after %d writes\n%s", job.Error, job.Write.IOs, fioOut.String())
	}
	t.Logf("stall: max %.0f ms (fio's longest write completion)", rep.Jobs[0].Write.ClatN.Max/1e6)
	resent := strings.Contains(b.logs(), "resent by the kernel")
	if planned && resent {
		t.Errorf("after a release the kernel resent requests:\n%s", b.logs())
	}
	t.Logf("the kernel resent requests the stopped attach had taken: %v", resent)

	data := make([]byte, 1<<20)
	rand.Read(data)
	f, err := os.Create(filepath.Join(mnt, "after"))
	if err != nil {
		t.Fatalf("filesystem after the takeover: %v", err)
	}
	if _, err := f.Write(data); err != nil {
		t.Fatalf("write after the takeover: %v", err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync after the takeover: %v", err)
	}
	f.Close()
	for _, l := range strings.Split(testutil.Run(t, "findmnt", "-n", "-o", "OPTIONS", mnt), ",") {
		if strings.TrimSpace(l) == "ro" {
			t.Errorf("the filesystem went read-only")
		}
	}
	name := filepath.Base(a.dev)
	for _, l := range dmesgSince(t, since) {
		if strings.Contains(l, name) && (strings.Contains(l, "EXT4-fs error") || strings.Contains(l, "I/O error")) {
			t.Errorf("kernel log: %s", l)
		}
	}
	testutil.Run(t, "umount", mnt)
	mounted = false
	b.stop(syscall.SIGTERM)
	assertIdentical(t, ps...)
	for deadline := time.Now().Add(5 * time.Second); running(holder); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the descriptor holder %d still runs after the detach", holder)
		}
	}
}
