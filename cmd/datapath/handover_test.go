package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/internal/testutil"
	"github.com/quorum-csi/quorum-csi/pkg/nbd"
)

// TestHandoverToSuccessor runs the data path binary as the DaemonSet's
// upgrade does: a new pod's process starts beside the running one and
// takes the node over. The old one must then stay quietly out of the
// way: it exits 0 when stopped (an error exit would have the kubelet
// restart it beside the successor), and a restart of its container
// (same pod, same instance) must not ask the successor for the node
// back, which made both pods' data paths take the node from each other
// in turns during helm upgrades.
func TestHandoverToSuccessor(t *testing.T) {
	srv := kubetest.Start(t)
	c, err := client.New(srv.Config, client.Options{Scheme: qvtest.Scheme(t)})
	if err != nil {
		t.Fatal(err)
	}
	qvtest.InstallCRD(t, c)
	bin := filepath.Join(t.TempDir(), "quorum-datapath")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	tlsDir, state, data := t.TempDir(), t.TempDir(), t.TempDir()
	if err := nbd.GenerateDevCA(tlsDir, nil); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(state, "datapath.sock")
	listen := kubetest.FreeAddr(t, "127.0.0.1")

	type proc struct {
		name string
		cmd  *exec.Cmd
		log  *testutil.SyncBuffer
		done chan error
	}
	start := func(instance string) *proc {
		p := &proc{name: instance, log: &testutil.SyncBuffer{}, done: make(chan error, 1)}
		p.cmd = exec.Command(bin, "--node-name", "n1", "--namespace", "default", "--kubeconfig", srv.Kubeconfig,
			"--data-dir", data, "--listen", listen, "--advertise-address", "127.0.0.1", "--metrics-address", "0",
			"--tls-dir", tlsDir, "--local-socket", filepath.Join(state, "nbd.sock"), "--socket", sock,
			"--state-dir", filepath.Join(state, "state"), "--frontend", "fuse-loop", "--instance", instance,
			"--handover-timeout", "30s")
		p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
		if err := p.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { p.done <- p.cmd.Wait() }()
		t.Cleanup(func() {
			p.cmd.Process.Kill()
			<-p.done
			if t.Failed() {
				t.Logf("%s:\n%s", instance, p.log.String())
			}
		})
		return p
	}
	ready := func(instance string) bool {
		var stderr strings.Builder
		return run([]string{"probe", "--socket", sock, "--instance", instance}, &stderr) == 0
	}
	waitReady := func(instance string) {
		t.Helper()
		for deadline := time.Now().Add(time.Minute); !ready(instance); time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s not ready within a minute", instance)
			}
		}
	}
	running := func(p *proc) error {
		select {
		case err := <-p.done:
			p.done <- err
			return fmt.Errorf("exited: %v", err)
		default:
			return nil
		}
	}

	old := start("pod-a")
	waitReady("pod-a")
	successor := start("pod-b")
	waitReady("pod-b")
	time.Sleep(time.Second)
	if err := running(old); err != nil {
		t.Fatalf("the data path that handed over %s; the kubelet would restart it", err)
	}
	if !strings.Contains(old.log.String(), "let go of the node") {
		t.Fatal("the old data path did not say it let go of the node")
	}

	// Its container restarts (a crash, an OOM kill): same pod, same
	// instance.
	old.cmd.Process.Kill()
	old.done <- <-old.done
	again := start("pod-a")
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(again.log.String(), "handed the node over"); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the restarted old data path did not say it handed the node over")
		}
		if err := running(again); err != nil {
			t.Fatalf("the restarted old data path %s", err)
		}
	}
	time.Sleep(2 * time.Second)
	if !ready("pod-b") || strings.Contains(successor.log.String(), "letting go") {
		t.Fatalf("the restarted old data path took the node from its successor:\n%s", successor.log.String())
	}

	for _, p := range []*proc{again, successor} {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-p.done:
			if err != nil {
				t.Errorf("%s on SIGTERM: %v", p.name, err)
			}
			p.done <- err
		case <-time.After(time.Minute):
			t.Fatalf("%s: no exit within a minute of SIGTERM", p.name)
		}
	}
}
