package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// status asks the attach serving replica p for its children.
func status(t *testing.T, dir, p string) []childStatus {
	t.Helper()
	out := mustQuorumctl(t, "status", "--json", "--state-dir", filepath.Join(dir, "state"), p)
	var rep struct {
		Children []childStatus `json:"children"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("status output %q: %v", out, err)
	}
	return rep.Children
}

type childStatus struct {
	Name       string `json:"name"`
	State      string `json:"state"`
	DirtyBytes int64  `json:"dirtyBytes"`
}

// TestReplicaFailsAndResyncs: while fio writes and verifies through the
// device, one replica fails every request for a while and then answers
// again. fio sees no error, the replica is resynced in the background,
// and the replicas end identical.
func TestReplicaFailsAndResyncs(t *testing.T) {
	dir := kernelTest(t, "fio")
	ps := replicas(t, dir, "512M", "a.img", "b.img", "c.img")
	control := filepath.Join(dir, "fail-c")
	a := attach(t, dir, "--fault-file", ps[2]+"="+control, "--probe-interval", "200ms", ps[0], ps[1], ps[2])
	wait := fioVerify(t, a.dev, "256M")
	time.Sleep(time.Second)
	os.WriteFile(control, nil, 0o600)
	sawFaulty := false
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && !sawFaulty; time.Sleep(100 * time.Millisecond) {
		st := status(t, dir, ps[0])
		sawFaulty = st[2].State == "faulty" && st[2].DirtyBytes > 0
	}
	if !sawFaulty {
		t.Fatalf("replica c never became faulty with dirty bytes: %+v", status(t, dir, ps[0]))
	}
	time.Sleep(time.Second)
	os.Remove(control)
	wait()
	waitChild(t, dir, ps[0], 2, "healthy", 30*time.Second)
	if !strings.Contains(a.logs(), `"event":"REPORT_BAD","op":"write"`) {
		t.Errorf("no REPORT_BAD for the failed writes in the log")
	}
	a.stop(syscall.SIGTERM)
	assertIdentical(t, ps...)
}

var (
	ioErrorRE = regexp.MustCompile(`io_u error on file .*: write offset=(\d+),`)
	badRE     = regexp.MustCompile(`verify: .* offset (\d+), length`)
)

// TestKillDuringWrites: quorumctl attach, and the holder that would keep
// its device for a successor, are killed with SIGKILL while fio
// writes. The next attach recovers the write intent before offering the
// device; fio then verifies every block whose write it saw acknowledged,
// and the replicas are identical.
func TestKillDuringWrites(t *testing.T) {
	dir := kernelTest(t, "fio")
	ps := replicas(t, dir, "2G", "a.img", "b.img", "c.img")
	a := attach(t, dir, ps...)
	// 1 GiB of 4k writes takes far longer than the 2.5 s before the kill,
	// even on a disk several times faster than ours.
	job := []string{"--name=crash", "--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bs=4k",
		"--iodepth=16", "--size=1G", "--verify=crc32c"}
	fio := exec.Command("fio", append(job, "--filename="+a.dev, "--verify_state_save=1", "--do_verify=1")...)
	fio.Dir = dir // where fio keeps its verify state
	var fioOut strings.Builder
	fio.Stdout, fio.Stderr = &fioOut, &fioOut
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2500 * time.Millisecond)
	a.cmd.Process.Kill()
	<-a.exited
	// The whole data path crashes: without the descriptor holder too,
	// a fuse-loop device would wait for the next attach to take it back
	// (TestFUSETakeoverAfterKill) instead of failing fio's writes.
	if pid := holderPID(t, a.stateDir); pid > 0 {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if fio.Wait() == nil {
		t.Fatalf("fio finished before the kill; make its job longer:\n%s", fioOut.String())
	}
	unacked := map[string]bool{}
	for _, m := range ioErrorRE.FindAllStringSubmatch(fioOut.String(), -1) {
		unacked[m[1]] = true
	}

	a = attach(t, dir, ps...)
	if !strings.Contains(a.logs(), "recovering the extents it had in flight") {
		t.Errorf("no recovery logged:\n%s", a.logs())
	}
	verify := exec.Command("fio", append(job, "--filename="+a.dev, "--verify_only", "--verify_state_load=1",
		"--verify_state_save=0", "--continue_on_error=verify")...)
	verify.Dir = dir
	vout, _ := verify.CombinedOutput()
	// fio replays errored writes too; only those may read back otherwise.
	for _, m := range badRE.FindAllStringSubmatch(string(vout), -1) {
		if !unacked[m[1]] {
			t.Errorf("acknowledged write at offset %s lost", m[1])
		}
	}
	if !strings.Contains(string(vout), "read:") {
		t.Fatalf("verify pass did not run:\n%s", vout)
	}
	// The verify pass read every extent, recovering it first.
	waitFor(t, a, "crash recovery done")
	a.stop(syscall.SIGTERM)
	assertIdentical(t, ps...)
}

func corrupt(t *testing.T, p string, off int64) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("silent corruption"), off); err != nil {
		t.Fatal(err)
	}
}

// TestScrubOffline: quorumctl scrub finds a silently corrupted replica,
// reports it and repairs it; three different versions are left alone
// with exit status 1.
func TestScrubOffline(t *testing.T) {
	dir := t.TempDir()
	ps := replicas(t, dir, "16M", "a.img", "b.img", "c.img")
	corrupt(t, ps[1], 5<<20+123)
	out, errOut, code := quorumctl(t, "scrub", ps[0], ps[1], ps[2])
	if code != 0 || !strings.Contains(out, "1 replica chunks repaired") || !strings.Contains(errOut, `"child":"`+ps[1]+`"`) {
		t.Fatalf("scrub: exit %d\n%s%s", code, out, errOut)
	}
	assertIdentical(t, ps...)
	corrupt(t, ps[0], 100)
	corrupt(t, ps[1], 101)
	if out, _, code := quorumctl(t, "scrub", ps[0], ps[1], ps[2]); code != 1 || !strings.Contains(out, "1 chunks without a majority") {
		t.Fatalf("scrub of three versions: exit %d\n%s", code, out)
	}
}

// TestBackgroundScrub: a fifo volume, whose reads never compare
// replicas, repairs silent corruption through the scrub that runs while
// it is attached.
func TestBackgroundScrub(t *testing.T) {
	dir := kernelTest(t)
	ps := replicas(t, dir, "64M", "a.img", "b.img", "c.img")
	corrupt(t, ps[0], 40<<20)
	a := attach(t, dir, "--read-pattern", "fifo", "--scrub-rate", "256M", ps[0], ps[1], ps[2])
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out := mustQuorumctl(t, "status", "--state-dir", filepath.Join(dir, "state"), ps[0])
		if strings.Contains(out, "scrub pass 1: 67108864 of 67108864 bytes, 1 repaired") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("scrub did not finish its pass:\n%s", out)
		}
	}
	a.stop(syscall.SIGTERM)
	assertIdentical(t, ps...)
}
