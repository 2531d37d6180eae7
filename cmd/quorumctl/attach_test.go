package main

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
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

// TestFilesystems: the device takes mkfs, a mount, files whose checksums
// survive a remount and a reattach, and fstrim, whose discards reach the
// replicas as holes.
func TestFilesystems(t *testing.T) {
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run(fs, func(t *testing.T) {
			dir := kernelTest(t, "mkfs."+fs, "fstrim", "mount", "umount")
			ps := replicas(t, dir, "512M", "a.img", "b.img", "c.img")
			mnt := filepath.Join(dir, "mnt")
			os.Mkdir(mnt, 0o700)

			a := attach(t, dir, ps...)
			testutil.Run(t, "mkfs."+fs, "-q", a.dev)
			testutil.Run(t, "mount", a.dev, mnt)
			mounted := true
			defer func() {
				if mounted {
					exec.Command("umount", mnt).Run()
				}
			}()
			sums := map[string]string{}
			for i := range 4 {
				name := filepath.Join(mnt, fmt.Sprintf("f%d", i))
				data := make([]byte, (i+1)*7<<20+i*1234)
				rand.Read(data)
				if err := os.WriteFile(name, data, 0o600); err != nil {
					t.Fatal(err)
				}
				sums[name] = sha(t, name)
			}
			testutil.Run(t, "umount", mnt)
			testutil.Run(t, "mount", a.dev, mnt)
			for name, want := range sums {
				if got := sha(t, name); got != want {
					t.Fatalf("%s checksum changed across remount", name)
				}
			}
			testutil.Run(t, "umount", mnt)
			mounted = false
			a.stop(syscall.SIGTERM)
			assertIdentical(t, ps...)

			// Reattach with another read pattern: same files.
			a = attach(t, dir, append([]string{"--read-pattern", "fifo"}, ps...)...)
			testutil.Run(t, "mount", a.dev, mnt)
			mounted = true
			for name, want := range sums {
				if got := sha(t, name); got != want {
					t.Fatalf("%s checksum changed across reattach", name)
				}
			}
			before := allocatedBytes(t, ps[0])
			for name := range sums {
				os.Remove(name)
			}
			// A remount settles the deletions: XFS leaves extents freed by
			// a transaction still in its log out of an FITRIM.
			testutil.Run(t, "umount", mnt)
			testutil.Run(t, "mount", a.dev, mnt)
			testutil.Run(t, "fstrim", mnt)
			testutil.Run(t, "umount", mnt)
			mounted = false
			a.stop(syscall.SIGINT)
			after := allocatedBytes(t, ps[0])
			if after > before-40<<20 {
				t.Errorf("fstrim freed %d bytes of a replica, want the deleted files' ~70 MiB", before-after)
			}
			assertIdentical(t, ps...)
		})
	}
}

// TestFioVerify: fio writes and verifies through the device at QD32.
func TestFioVerify(t *testing.T) {
	for _, pattern := range []string{"quorum", "fifo"} {
		t.Run(pattern, func(t *testing.T) {
			dir := kernelTest(t, "fio")
			ps := replicas(t, dir, "256M", "a.img", "b.img", "c.img")
			a := attach(t, dir, append([]string{"--read-pattern", pattern}, ps...)...)
			out := testutil.Run(t, "fio", "--name=verify", "--filename="+a.dev, "--ioengine=libaio", "--direct=1",
				"--rw=randwrite", "--bs=4k", "--bsrange=4k-64k", "--iodepth=32", "--size=128M",
				"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse", "--terse-version=3")
			// Terse v3: field 5 is the job's error count.
			if f := strings.Split(strings.TrimSpace(out), ";"); len(f) < 5 || f[4] != "0" {
				t.Fatalf("fio reported errors: %s", out)
			}
			a.stop(syscall.SIGTERM)
			assertIdentical(t, ps...)
		})
	}
}

// TestOverlappingWrites: four fio jobs write the same 4 MiB at once, in
// random overlapping sizes; afterwards the replicas are byte-identical.
func TestOverlappingWrites(t *testing.T) {
	dir := kernelTest(t, "fio")
	ps := replicas(t, dir, "64M", "a.img", "b.img", "c.img")
	a := attach(t, dir, ps...)
	testutil.Run(t, "fio", "--name=overlap", "--filename="+a.dev, "--ioengine=libaio", "--direct=1",
		"--rw=randwrite", "--bsrange=512-256k", "--iodepth=32", "--numjobs=4", "--size=4M",
		"--io_size=64M", "--randrepeat=0", "--refill_buffers", "--norandommap")
	a.stop(syscall.SIGTERM)
	assertIdentical(t, ps...)
}

// TestCorruptedReplicaOutvoted: a replica silently corrupted on disk loses
// the vote and is reported; with --rewrite-corrupted it is repaired.
func TestCorruptedReplicaOutvoted(t *testing.T) {
	dir := kernelTest(t, "dd")
	ps := replicas(t, dir, "16M", "a.img", "b.img", "c.img")
	a := attach(t, dir, ps...)
	data := ddRandom(t, dir, a.dev, 1, 2)
	a.stop(syscall.SIGTERM)

	// Flip bytes of the middle replica, behind the engine's back.
	f, err := os.OpenFile(ps[1], os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("corruption"), 2<<20+5000)
	f.Close()
	if o, _, code := quorumctl(t, "check", ps[0], ps[1], ps[2]); code != 1 || !strings.Contains(o, "differ at 2101248 length 4096: "+ps[0]+" "+ps[2]+" | "+ps[1]) {
		t.Fatalf("check after corruption: exit %d\n%s", code, o)
	}

	read := func(a *attached) []byte {
		out := filepath.Join(dir, "out")
		testutil.Run(t, "dd", "if="+a.dev, "of="+out, "bs=1M", "skip=2", "count=1", "iflag=direct", "status=none")
		b, _ := os.ReadFile(out)
		return b
	}
	for _, tc := range []struct {
		flags     []string
		repaired  bool
		corrupted bool // whether the read may return the corruption
	}{
		{flags: nil},
		{flags: []string{"--vote-threshold", "3"}, corrupted: true},
		{flags: []string{"--rewrite-corrupted"}, repaired: true},
	} {
		a := attach(t, dir, append(tc.flags, ps...)...)
		cmd := exec.Command("dd", "if="+a.dev, "of="+filepath.Join(dir, "out"), "bs=1M", "skip=2", "count=1", "iflag=direct", "status=none")
		err := cmd.Run()
		if tc.corrupted {
			if err == nil {
				t.Errorf("%v: read succeeded with only 2 of 3 agreeing under threshold 3", tc.flags)
			}
			waitFor(t, a, `"event":"QUORUM_FAILURE"`)
		} else {
			if err != nil {
				t.Fatalf("%v: read: %v", tc.flags, err)
			}
			if got := read(a); !bytes.Equal(got, data) {
				t.Fatalf("%v: read the corrupted version", tc.flags)
			}
			waitFor(t, a, `"event":"REPORT_BAD","op":"read","offset":2097152,"length":`)
			if !strings.Contains(a.logs(), `"child":"`+ps[1]+`"`) {
				t.Errorf("%v: REPORT_BAD does not name the corrupted replica:\n%s", tc.flags, a.logs())
			}
		}
		a.stop(syscall.SIGTERM)
		_, _, code := quorumctl(t, "check", ps[0], ps[1], ps[2])
		if repaired := code == 0; repaired != tc.repaired {
			t.Fatalf("%v: replicas identical = %v, want %v", tc.flags, repaired, tc.repaired)
		}
	}
}

// ddRandom writes mib MiB of random bytes to dev, seek MiB into it, with
// dd and direct I/O, and returns them.
func ddRandom(t *testing.T, dir, dev string, mib, seek int) []byte {
	t.Helper()
	data := make([]byte, mib<<20)
	rand.Read(data)
	src := filepath.Join(dir, "data")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	testutil.Run(t, "dd", "if="+src, "of="+dev, "bs=1M", fmt.Sprint("seek=", seek), "oflag=direct", "status=none")
	return data
}

func waitFor(t *testing.T, a *attached, s string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(a.logs(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s in attach's log:\n%s", s, a.logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestQEMUReadsReplicas: bytes written through our device are what QEMU's
// own quorum driver reads from the same raw replica files.
func TestQEMUReadsReplicas(t *testing.T) {
	dir := kernelTest(t, "qemu-img", "qemu-io", "dd")
	ps := replicas(t, dir, "32M", "a.img", "b.img", "c.img")
	a := attach(t, dir, ps...)
	data := ddRandom(t, dir, a.dev, 8, 3)
	testutil.Run(t, "blkdiscard", "--offset", "0", "--length", "1048576", a.dev)
	a.stop(syscall.SIGTERM)

	var children []string
	for _, p := range ps {
		children = append(children, fmt.Sprintf(`{"driver":"raw","file":{"driver":"file","filename":%q}}`, p))
	}
	for _, pattern := range []string{"quorum", "fifo"} {
		spec := fmt.Sprintf(`json:{"driver":"quorum","vote-threshold":2,"read-pattern":%q,"children":[%s]}`, pattern, strings.Join(children, ","))
		out := filepath.Join(dir, "qemu-"+pattern+".raw")
		testutil.Run(t, "qemu-img", "convert", "-O", "raw", spec, out)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 32<<20 || !bytes.Equal(got[3<<20:11<<20], data) {
			t.Fatalf("QEMU (%s) reads other bytes than we wrote", pattern)
		}
		if !bytes.Equal(got[:3<<20], make([]byte, 3<<20)) || !bytes.Equal(got[11<<20:], make([]byte, 21<<20)) {
			t.Fatalf("QEMU (%s) reads data outside what we wrote", pattern)
		}
	}
	// qemu-io reading through quorum with a pattern check on a 4k block.
	spec := fmt.Sprintf(`json:{"driver":"quorum","vote-threshold":3,"children":[%s]}`, strings.Join(children, ","))
	out := testutil.Run(t, "qemu-io", "-r", "-c", fmt.Sprintf("read -P 0x%02x %d 1", data[4096], 3<<20+4096), spec)
	if !strings.Contains(out, "read 1/1 bytes") {
		t.Fatalf("qemu-io: %s", out)
	}
}

// TestDetachWaitsForUsers: SIGTERM while a filesystem is mounted on the
// device does not pull the device from under it; the detach completes
// once the filesystem is unmounted, with every write kept.
func TestDetachWaitsForUsers(t *testing.T) {
	dir := kernelTest(t, "mkfs.ext4", "mount", "umount")
	ps := replicas(t, dir, "64M", "a.img", "b.img", "c.img")
	mnt := filepath.Join(dir, "mnt")
	os.Mkdir(mnt, 0o700)
	a := attach(t, dir, ps...)
	testutil.Run(t, "mkfs.ext4", "-q", a.dev)
	testutil.Run(t, "mount", a.dev, mnt)
	defer exec.Command("umount", mnt).Run()
	a.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, a, `"msg":"detaching"`)
	time.Sleep(500 * time.Millisecond)
	select {
	case <-a.exited:
		t.Fatalf("attach exited while its device was mounted\n%s", a.logs())
	default:
	}
	data := make([]byte, 3<<20)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(mnt, "late"), data, 0o600); err != nil {
		t.Fatalf("write after SIGTERM while mounted: %v", err)
	}
	testutil.Run(t, "umount", mnt)
	a.wait()
	assertIdentical(t, ps...)

	a = attach(t, dir, ps...)
	testutil.Run(t, "mount", a.dev, mnt)
	got, err := os.ReadFile(filepath.Join(mnt, "late"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("file written after SIGTERM lost: %v", err)
	}
	testutil.Run(t, "umount", mnt)
	a.stop(syscall.SIGTERM)
}

// TestMetrics: attach --metrics-address serves the volume's requests,
// events and replica states to Prometheus.
func TestMetrics(t *testing.T) {
	dir := kernelTest(t)
	ps := replicas(t, dir, "64M", "a.img", "b.img", "c.img")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	a := attach(t, dir, "--metrics-address", addr, ps[0], ps[1], ps[2])
	f, err := os.OpenFile(a.dev, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignbuf.Make(1<<20, 1<<20)
	if _, err := f.WriteAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`quorum_volume_requests_total{op="write",volume=`,
		`quorum_volume_request_seconds_bucket{op="write"`,
		`quorum_replica_state{replica="` + ps[1] + `",state="healthy"`,
		`quorum_replica_out_of_sync_bytes{replica="` + ps[2] + `"`,
		"go_goroutines",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	a.stop(syscall.SIGTERM)
}
