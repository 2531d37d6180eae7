// Package guest runs quorum-csi inside, and underneath, a QEMU guest
// booted under software emulation: the kernel features the test
// machines lack (ublk) live in the guest's kernel, and a VM using a
// quorumctl device as its disk is how KubeVirt uses a Block volume.
// build.sh makes the kernel and initramfs, run.sh boots them; the tests
// here drive both.
package guest

import (
	"bufio"
	"bytes"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

var (
	buildDir  string // kernel and initramfs
	quorumctl string // host build of quorumctl
	buildErr  error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "quorum-guest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	buildDir, quorumctl = filepath.Join(dir, "boot"), filepath.Join(dir, "quorumctl")
	if os.Geteuid() == 0 {
		buildErr = build(dir)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func build(dir string) error {
	if out, err := exec.Command("go", "build", "-o", quorumctl, "../../cmd/quorumctl").CombinedOutput(); err != nil {
		return fmt.Errorf("build quorumctl: %v\n%s", err, out)
	}
	for _, tool := range []string{"qemu-system-x86_64", "busybox", "cpio", "xz", "debugfs", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found", tool)
		}
	}
	cmd := exec.Command("bash", "build.sh", buildDir)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("e2e/guest/build.sh: %v\n%s", err, out.String())
	}
	return nil
}

// ready gates a guest test: root, the tools and the guest build.
func ready(t *testing.T) {
	t.Helper()
	testutil.RequireKernel(t)
	if buildErr != nil {
		testutil.Unavailable(t, "guest build: "+buildErr.Error())
	}
}

// boot runs one in-guest test with extra QEMU arguments; it returns the
// console and fails the test unless the guest reports status 0.
func boot(t *testing.T, test string, qemuArgs ...string) string {
	t.Helper()
	cmd := exec.Command("bash", append([]string{"run.sh", buildDir, test}, qemuArgs...)...)
	cmd.Env = append(os.Environ(), "GUEST_TIMEOUT=600")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	err := cmd.Run()
	t.Logf("guest %s ran %s", test, time.Since(start).Round(time.Second))
	if err != nil {
		t.Fatalf("guest test %s: %v\n%s", test, err, out.String())
	}
	return out.String()
}

// hostAttach runs quorumctl attach on the host over the replicas and
// returns the device; the cleanup detaches it (SIGTERM) and expects a
// clean exit.
func hostAttach(t *testing.T, dir string, replicas ...string) (dev string, detach func()) {
	t.Helper()
	cmd := exec.Command(quorumctl, append([]string{"attach", "--state-dir", filepath.Join(dir, "state"), "--scrub-rate", "0"}, replicas...)...)
	var logs bytes.Buffer
	cmd.Stderr = &logs
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	lines := make(chan string, 1)
	go func() {
		br := bufio.NewReader(stdout)
		l, _ := br.ReadString('\n')
		lines <- strings.TrimSpace(l)
		io.Copy(io.Discard, br)
		exited <- cmd.Wait()
	}()
	done := false
	detach = func() {
		t.Helper()
		if done {
			return
		}
		done = true
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("attach exited with %v\n%s", err, logs.String())
			}
		case <-time.After(60 * time.Second):
			cmd.Process.Kill()
			<-exited
			t.Errorf("attach did not detach within 60s\n%s", logs.String())
		}
	}
	t.Cleanup(detach)
	select {
	case dev = <-lines:
		if !strings.HasPrefix(dev, "/dev/") {
			t.Fatalf("attach printed %q\n%s", dev, logs.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("attach printed no device\n%s", logs.String())
	}
	return dev, detach
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// debugfsCat reads a file out of an ext4 image without mounting it.
func debugfsCat(t *testing.T, image, path string) []byte {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", "cat "+path, image).Output()
	if err != nil {
		t.Fatalf("debugfs cat %s in %s: %v", path, image, err)
	}
	return out
}

func newReplicas(t *testing.T, dir, size string) []string {
	t.Helper()
	ps := []string{filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img"), filepath.Join(dir, "c.img")}
	run(t, quorumctl, append([]string{"create", "--size", size}, ps...)...)
	return ps
}

// qemuDisk is how KubeVirt's virt-launcher gives a Block volume to QEMU.
func qemuDisk(dev string) []string {
	return []string{"-drive", "file=" + dev + ",format=raw,if=virtio,cache=none,aio=native"}
}

var guestMD5 = regexp.MustCompile(`GUEST-MD5 ([0-9a-f]{32})`)

// TestVMDisk: a VM whose disk is a quorumctl device makes a filesystem,
// writes a file and runs fio with verify on the raw disk; after it exits
// the three replicas are identical and hold the file it wrote.
func TestVMDisk(t *testing.T) {
	ready(t)
	dir := testutil.KernelDir(t)
	ps := newReplicas(t, dir, "512M")
	dev, detach := hostAttach(t, dir, ps...)
	console := boot(t, "vmdisk", qemuDisk(dev)...)
	if !strings.Contains(console, "GUEST-FIO errors=0") {
		t.Errorf("fio in the guest reported errors:\n%s", console)
	}
	m := guestMD5.FindStringSubmatch(console)
	if m == nil {
		t.Fatalf("the guest printed no checksum:\n%s", console)
	}
	detach()
	run(t, quorumctl, append([]string{"check"}, ps...)...)
	sum := md5.Sum(debugfsCat(t, ps[2], "/data"))
	if got := hex.EncodeToString(sum[:]); got != m[1] {
		t.Fatalf("replica holds a file with md5 %s, the guest wrote %s", got, m[1])
	}
}

// TestVMBootsFromQuorumDevice: the guest's root filesystem lives on a
// quorumctl device; its init writes a file and powers off. The replicas
// are identical and hold the file.
func TestVMBootsFromQuorumDevice(t *testing.T) {
	ready(t)
	dir := testutil.KernelDir(t)
	root := filepath.Join(dir, "rootfs")
	for _, d := range []string{"bin", "sbin", "proc", "sys", "dev", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal(err)
	}
	run(t, "cp", busybox, filepath.Join(root, "bin", "busybox"))
	for _, a := range []string{"sh", "mount", "cat", "echo", "poweroff", "sync", "grep"} {
		os.Symlink("busybox", filepath.Join(root, "bin", a))
	}
	init := `#!/bin/sh
mount -t proc proc /proc
echo "root: $(grep ' / ' /proc/mounts)"
echo booted-from-a-quorum-device > /guest-was-here
sync
echo "TEST-RC: 0"
poweroff -f
`
	if err := os.WriteFile(filepath.Join(root, "sbin", "init"), []byte(init), 0o755); err != nil {
		t.Fatal(err)
	}
	ps := newReplicas(t, dir, "256M")
	dev, detach := hostAttach(t, dir, ps...)
	run(t, "mkfs.ext4", "-q", "-F", "-d", root, dev)
	console := boot(t, "boot-vda", qemuDisk(dev)...)
	if !strings.Contains(console, "root: /dev/vda / ext4") {
		t.Errorf("the guest's root is not /dev/vda:\n%s", console)
	}
	detach()
	run(t, quorumctl, append([]string{"check"}, ps...)...)
	if got := strings.TrimSpace(string(debugfsCat(t, ps[1], "/guest-was-here"))); got != "booted-from-a-quorum-device" {
		t.Fatalf("replica holds %q in /guest-was-here", got)
	}
}

// TestGuestFrontends runs quorumctl attach inside the guest kernel, which
// has ublk (the test machines' kernel does not). With each frontend: a
// filesystem and checksums across a remount, fio verify at QD32, a
// corrupted replica outvoted, no device left after SIGTERM. And ublk's
// user recovery: the attach is killed with SIGKILL, then releases the
// device on SIGUSR1, while fio writes and verifies through a filesystem;
// each time a new attach takes the device back, fio sees no error, the
// filesystem stays writable and the kernel complains of nothing; the
// replicas end identical. The stalls the guest measured are logged.
func TestGuestFrontends(t *testing.T) {
	for _, tc := range []struct {
		test string
		want []string
	}{
		{"ublk", []string{"fio verify passed", "corrupted replica outvoted"}},
		{"fuseloop", []string{"fio verify passed", "corrupted replica outvoted"}},
		{"ublkrecovery", []string{"taken back after SIGKILL with no error", "taken back after SIGUSR1 with no error", "replicas identical"}},
	} {
		t.Run(tc.test, func(t *testing.T) {
			ready(t)
			scratch := filepath.Join(testutil.KernelDir(t), "scratch.img")
			if err := os.WriteFile(scratch, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(scratch, 1<<30); err != nil {
				t.Fatal(err)
			}
			console := boot(t, tc.test, "-drive", "file="+scratch+",format=raw,if=virtio,cache=none")
			for _, l := range strings.Split(console, "\n") {
				if strings.HasPrefix(l, "stall: ") {
					t.Log(strings.TrimSpace(l))
				}
			}
			for _, want := range tc.want {
				if !strings.Contains(console, want) {
					t.Errorf("guest console lacks %q:\n%s", want, console)
				}
			}
		})
	}
}
