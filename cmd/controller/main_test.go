package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/controller"
	"github.com/quorum-csi/quorum-csi/pkg/csi"
)

// TestBinary builds the controller and runs it against a real API server
// with its default leader election and --resizer: it must become ready,
// answer CSI calls on its endpoint, place the volume CreateVolume made,
// serve the phase gauges, the agents' Lease gauge and its worker count
// (--workers), expand the volume when its claim's request grows, and
// exit 0 on SIGTERM.
func TestBinary(t *testing.T) {
	srv, c := qvtest.Start(t)
	ctx := t.Context()
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{"kubernetes.io/hostname": "node-a"}}}
	if err := c.Create(ctx, node); err != nil {
		t.Fatal(err)
	}
	if err := contract.RenewLease(ctx, c, c, contract.DefaultNamespace, "node-a", time.Hour); err != nil {
		t.Fatal(err)
	}

	bin := filepath.Join(t.TempDir(), "controller")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	metricsAddr, probeAddr := kubetest.FreeAddr(t, "127.0.0.1"), kubetest.FreeAddr(t, "127.0.0.1")
	logPath := filepath.Join(t.TempDir(), "controller.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	sock := filepath.Join(t.TempDir(), "csi.sock")
	cmd := exec.Command(bin, "--kubeconfig", srv.Kubeconfig, "--csi-endpoint", "unix://"+sock,
		"--metrics-bind-address", metricsAddr, "--health-probe-bind-address", probeAddr, "--resizer=true")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Dies with the test binary even when cleanups do not run.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("controller log:\n%s", b)
		}
	})

	poll(t, "readyz", func() (bool, error) {
		body, ok := get("http://" + probeAddr + "/readyz")
		return ok && body == "ok", nil
	})
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	poll(t, "CSI Probe ready", func() (bool, error) {
		resp, err := csipb.NewIdentityClient(conn).Probe(ctx, &csipb.ProbeRequest{})
		return err == nil && resp.GetReady().GetValue(), nil
	})
	created, err := csipb.NewControllerClient(conn).CreateVolume(ctx, &csipb.CreateVolumeRequest{
		Name:          "vol",
		CapacityRange: &csipb.CapacityRange{RequiredBytes: 1 << 20},
		VolumeCapabilities: []*csipb.VolumeCapability{{
			AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
			AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		}},
		Parameters: map[string]string{"replicas": "1"},
	})
	if err != nil {
		t.Fatalf("CreateVolume: %v", err)
	}
	qv := &v1alpha1.QuorumVolume{ObjectMeta: metav1.ObjectMeta{Name: created.GetVolume().GetVolumeId()}}
	poll(t, "the replica placed on node-a", func() (bool, error) {
		if err := c.Get(ctx, client.ObjectKeyFromObject(qv), qv); err != nil {
			return false, err
		}
		return len(qv.Status.Replicas) == 1 && qv.Status.Replicas[0].Node == "node-a", nil
	})
	for _, want := range []string{
		`quorum_volumes{phase="Pending"} 1`,
		fmt.Sprintf(`quorum_volume_phase{phase="Pending",volume=%q} 1`, qv.Name),
		`quorum_agent_lease_current{node="node-a"} 1`,
		fmt.Sprintf(`controller_runtime_max_concurrent_reconciles{controller="quorumvolume"} %d`, controller.DefaultWorkers),
	} {
		poll(t, want+" on /metrics", func() (bool, error) {
			body, ok := get("http://" + metricsAddr + "/metrics")
			return ok && strings.Contains(body, want), nil
		})
	}

	expandClaim(t, c, qv.Name)

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Errorf("controller exited with %v after SIGTERM, want 0", err)
		}
	case <-time.After(30 * time.Second):
		t.Errorf("controller still running 30 s after SIGTERM")
	}
}

// expandClaim binds a claim to a PV of volume (1 MiB), as the provisioner
// and the PV controller would, raises its request to 2 MiB and waits for
// the resizer to hand it to the kubelet.
func expandClaim(t *testing.T, c client.Client, volume string) {
	ctx := t.Context()
	size, rwo := resource.MustParse("1Mi"), []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}
	sc := &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "expandable"}, Provisioner: csi.DriverName, AllowVolumeExpansion: ptr.To(true)}
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: "data", Namespace: metav1.NamespaceDefault},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes: rwo, StorageClassName: &sc.Name, VolumeName: volume,
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: size}},
		},
	}
	for _, o := range []client.Object{sc, pvc} {
		if err := c.Create(ctx, o); err != nil {
			t.Fatal(err)
		}
	}
	pv := &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: volume},
		Spec: corev1.PersistentVolumeSpec{
			Capacity: corev1.ResourceList{corev1.ResourceStorage: size}, AccessModes: rwo, StorageClassName: sc.Name,
			ClaimRef:               &corev1.ObjectReference{Namespace: pvc.Namespace, Name: pvc.Name, UID: pvc.UID},
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{Driver: csi.DriverName, VolumeHandle: volume}},
		},
	}
	if err := c.Create(ctx, pv); err != nil {
		t.Fatal(err)
	}
	pvc.Status = corev1.PersistentVolumeClaimStatus{Phase: corev1.ClaimBound, AccessModes: rwo, Capacity: corev1.ResourceList{corev1.ResourceStorage: size}}
	if err := c.Status().Update(ctx, pvc); err != nil {
		t.Fatal(err)
	}
	// The resize admission sees the StorageClass through an informer.
	poll(t, "the claim's request raised to 2 MiB", func() (bool, error) {
		if err := c.Get(ctx, client.ObjectKeyFromObject(pvc), pvc); err != nil {
			return false, err
		}
		pvc.Spec.Resources.Requests[corev1.ResourceStorage] = resource.MustParse("2Mi")
		return c.Update(ctx, pvc) == nil, nil
	})
	poll(t, "the claim waiting for node expansion and the PV at 2 MiB", func() (bool, error) {
		if err := c.Get(ctx, client.ObjectKeyFromObject(pvc), pvc); err != nil {
			return false, err
		}
		if err := c.Get(ctx, client.ObjectKeyFromObject(pv), pv); err != nil {
			return false, err
		}
		pvCap := pv.Spec.Capacity[corev1.ResourceStorage]
		return pvc.Status.AllocatedResourceStatuses[corev1.ResourceStorage] == corev1.PersistentVolumeClaimNodeResizePending &&
			pvCap.Cmp(resource.MustParse("2Mi")) == 0, nil
	})
}

func get(url string) (string, bool) {
	resp, err := http.Get(url)
	if err != nil {
		return "", false
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err == nil && resp.StatusCode == http.StatusOK
}

func poll(t *testing.T, what string, ok func() (bool, error)) {
	t.Helper()
	err := wait.PollUntilContextTimeout(t.Context(), 100*time.Millisecond, 60*time.Second, true, func(context.Context) (bool, error) { return ok() })
	if err != nil {
		t.Fatal(fmt.Errorf("waiting for %s: %w", what, err))
	}
}
