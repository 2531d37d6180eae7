// Package images builds the project's container images with
// hack/images.sh (no container engine) and runs them in a real
// containerd, as the kubelets of the e2e cluster will.
package images

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

// startContainerd runs a private containerd (its own root, state and
// socket under dir) and returns its socket.
func startContainerd(t *testing.T, dir string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "containerd.sock")
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte("version = 2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	cmd := exec.Command("containerd", "--config", cfg, "--root", filepath.Join(dir, "root"),
		"--state", filepath.Join(dir, "state"), "--address", sock)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("containerd log:\n%s", logs.String())
		}
	})
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not start:\n%s", logs.String())
		}
	}
}

func ctr(t *testing.T, sock string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ctr", append([]string{"--address", sock, "--namespace", "quorum-test"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ctr %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestImagesRunInContainerd: both images import into containerd and run:
// the binaries start, and the node image has the tools the node plugin
// calls.
func TestImagesRunInContainerd(t *testing.T) {
	testutil.RequireKernel(t)
	testutil.RequireTools(t, "containerd", "ctr", "runc", "debootstrap", "go")
	dir := t.TempDir()
	out := filepath.Join(dir, "images")
	build := exec.Command("bash", "../../hack/images.sh", out)
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("hack/images.sh: %v\n%s", err, b)
	}
	sock := startContainerd(t, filepath.Join(dir, "containerd"))
	for _, f := range []string{"quorum-csi-controller.tar", "quorum-csi-node.tar"} {
		ctr(t, sock, "images", "import", filepath.Join(out, f))
	}
	images := ctr(t, sock, "images", "ls", "-q")
	for _, want := range []string{"docker.io/quorum-csi/controller:dev", "docker.io/quorum-csi/node:dev"} {
		if !strings.Contains(images, want) {
			t.Fatalf("containerd lacks %s after import:\n%s", want, images)
		}
	}
	for i, tc := range []struct {
		image string
		cmd   []string
		want  string
	}{
		{"docker.io/quorum-csi/node:dev", []string{"/usr/local/bin/quorumctl", "help"}, "commands:"},
		{"docker.io/quorum-csi/node:dev", []string{"sh", "-c", "mkfs.ext4 -V 2>&1; mkfs.xfs -V; blkid -V; losetup -V; mount -V"}, "mkfs.xfs version"},
		{"docker.io/quorum-csi/node:dev", []string{"/usr/local/bin/quorum-node", "-h"}, "-datapath-socket"},
		{"docker.io/quorum-csi/node:dev", []string{"/usr/local/bin/quorum-datapath", "-h"}, "-data-dir"},
		{"docker.io/quorum-csi/controller:dev", []string{"/usr/local/bin/quorum-controller", "-h"}, "-csi-endpoint"},
	} {
		// ctr run exits with the command's status; -h may exit 0 or 2.
		args := append([]string{"--address", sock, "--namespace", "quorum-test", "run", "--rm", tc.image, fmt.Sprintf("smoke-%d", i)}, tc.cmd...)
		b, _ := exec.Command("ctr", args...).CombinedOutput()
		if !strings.Contains(string(b), tc.want) {
			t.Errorf("%s %v: output lacks %q:\n%s", tc.image, tc.cmd, tc.want, b)
		}
	}
}
