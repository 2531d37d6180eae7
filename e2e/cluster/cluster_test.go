// Package cluster runs quorum-csi the way users meet it: a real
// three-node Kubernetes cluster on this machine (build.sh, cluster.sh),
// the Helm chart installed with helm, and scenarios that use PVCs in pods
// and QuorumVolumes made with kubectl. TestCluster builds what is missing
// (cached between runs), brings the cluster up, runs the scenarios in
// order and tears everything down, failing if anything is left behind.
package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/e2e/chart"
	"github.com/quorum-csi/quorum-csi/internal/testutil"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

const (
	// namespace is the driver's (contract.DefaultNamespace); the chart
	// is installed there.
	namespace = "quorum-csi"
	// appNamespace holds the scenarios' PVCs and pods.
	appNamespace = "e2e"
	appImage     = "quorum-csi/e2e-app:dev"
)

// nodeIPs are cluster.sh's node addresses.
var nodeIPs = map[string]string{"node1": "10.203.0.11", "node2": "10.203.0.12", "node3": "10.203.0.13"}

type cluster struct {
	t          *testing.T
	dir        string // this package's folder
	root       string // cluster.sh's state folder
	kubeconfig string
	kubectlBin string
	certs      string   // the TLS folder the chart's Secret was made from
	quorumctl  string   // built from this tree
	failed     []string // the scenarios that failed, named again last: CI shows a log's tail
}

func TestCluster(t *testing.T) {
	testutil.RequireKernel(t)
	testutil.RequireTools(t, "containerd", "ctr", "runc", "iptables", "openssl", "nsenter", "unshare",
		"debootstrap", "curl", "losetup", "findmnt")
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		testutil.Unavailable(t, "needs the CNI plugins in /usr/lib/cni (apt-get install containernetworking-plugins)")
	}
	if _, err := os.Stat("/sys/fs/cgroup/cpuset"); err != nil {
		testutil.Unavailable(t, "cluster.sh needs cgroup v1 hierarchies in /sys/fs/cgroup")
	}
	c := start(t)
	// Each scenario leaves the cluster as it found it; an earlier
	// failure does not stop the later ones.
	for _, s := range []struct {
		name string
		run  func(*testing.T)
	}{
		{"QuorumVolumeWithKubectl", c.quorumVolumeWithKubectl},
		{"FilesystemPVCMovesToAnotherNode", c.filesystemPVCMoves},
		{"BlockPVC", c.blockPVC},
		{"NodeCutOffDuringFio", c.nodeCutOff},
		{"PVCExpansion", c.pvcExpansion},
		{"ScrubRepairsFifoVolume", c.scrubRepairsFifoVolume},
		{"NodePluginKilled", c.nodePluginKilled},
		{"DataPathKilled", c.dataPathKilled},
		{"NodeRolloutRestart", c.nodeRolloutRestart},
		{"HelmUpgrade", c.helmUpgrade},
		{"LiveMigration", c.liveMigration},
		{"LiveMigrationCancelled", c.liveMigrationCancelled},
		{"LiveMigrationReplicaCut", c.liveMigrationReplicaCut},
		{"LiveMigrationBackAndForth", c.liveMigrationBackAndForth},
	} {
		began := time.Now()
		if !t.Run(s.name, s.run) {
			c.failed = append(c.failed, s.name)
			c.dumpDataPaths(began)
		}
	}
}

// dumpDataPaths logs, right after a scenario failed, what every data
// path and node plugin container said since the scenario began, those
// that were restarted (--previous) too: the dump at the end of the test
// shows only the last lines, long after.
func (c *cluster) dumpDataPaths(since time.Time) {
	pods := strings.Fields(c.kubectl("-n", namespace, "get", "pods", "-l", "app.kubernetes.io/component in (node,datapath)",
		"-o", "jsonpath={.items[*].metadata.name}"))
	for _, p := range pods {
		for _, previous := range []bool{true, false} {
			args := []string{"-n", namespace, "logs", p, "--all-containers", "--prefix", "--since-time=" + since.UTC().Format(time.RFC3339)}
			if previous {
				args = append(args, "--previous")
			}
			if out, err := c.kubectlErr(args...); err == nil || !previous {
				c.t.Logf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
	}
}

// start builds what is missing, brings the cluster up and installs the
// chart. Its cleanup tears everything down and checks for leftovers.
func start(t *testing.T) *cluster {
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, dir: dir, root: os.Getenv("QUORUM_E2E_ROOT")}
	if c.root == "" {
		c.root = "/var/lib/quorum-e2e"
	}
	binDir := os.Getenv("QUORUM_K8S_BIN")
	if binDir == "" {
		binDir = "/var/cache/quorum-csi/k8s/v1.37.2/bin"
	}
	c.kubectlBin = filepath.Join(binDir, "kubectl")

	began := time.Now()
	c.script(30*time.Minute, "build.sh")
	t.Logf("build: %s", time.Since(began).Round(time.Second))

	began = time.Now()
	t.Cleanup(c.teardown)
	c.kubeconfig = strings.TrimSpace(c.script(5*time.Minute, "cluster.sh", "up"))
	t.Logf("cluster up: %s", time.Since(began).Round(time.Second))

	began = time.Now()
	c.installChart()
	t.Logf("chart installed and ready: %s", time.Since(began).Round(time.Second))
	c.kubectl("create", "namespace", appNamespace)
	return c
}

// script runs one of this package's scripts, logging its output as it
// comes, and returns its standard output.
func (c *cluster) script(timeout time.Duration, name string, args ...string) string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var stdout bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", append([]string{filepath.Join(c.dir, name)}, args...)...)
	cmd.Stdout = &stdout
	cmd.Stderr = testLogWriter{c.t, name}
	if err := cmd.Run(); err != nil {
		c.t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return stdout.String()
}

// testLogWriter logs each write of a script's stderr as it happens, so a
// long build shows progress under go test -v.
type testLogWriter struct {
	t      *testing.T
	prefix string
}

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s: %s", w.prefix, strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// teardown deletes the scenarios' objects while the cluster still runs,
// so the node plugins unstage and detach as they would in use; then
// cluster.sh down, and cluster.sh leaks must find nothing.
func (c *cluster) teardown() {
	t := c.t
	if c.kubeconfig != "" {
		if t.Failed() {
			c.dumpLogs()
		}
		if _, err := c.kubectlErr("delete", "namespace", appNamespace, "--ignore-not-found", "--timeout=120s"); err != nil {
			// What holds the namespace, and the driver's view of it.
			for _, args := range [][]string{
				{"-n", appNamespace, "get", "pods,pvc", "-o", "wide"},
				{"-n", appNamespace, "describe", "pods"},
				{"get", "qv,volumeattachments", "-o", "wide"},
				{"-n", namespace, "logs", "-l", "app.kubernetes.io/component=node", "--tail=40", "--prefix"},
			} {
				out, err := c.kubectlErr(args...)
				t.Logf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			t.Errorf("delete the scenarios' namespace: %v", err)
		}
		if _, err := c.kubectlErr("delete", "qv", "--all", "--timeout=60s"); err != nil {
			t.Errorf("delete QuorumVolumes: %v", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "bash", filepath.Join(c.dir, "cluster.sh"), "down").CombinedOutput(); err != nil {
		t.Errorf("cluster.sh down: %v\n%s", err, out)
	}
	if out, err := exec.Command("bash", filepath.Join(c.dir, "cluster.sh"), "leaks").CombinedOutput(); err != nil {
		t.Errorf("the cluster left things behind:\n%s", out)
	}
	if len(c.failed) > 0 {
		t.Logf("failed scenarios: %s", strings.Join(c.failed, ", "))
	}
}

// dumpLogs shows what a failed run needs: the driver's logs and the
// cluster's view.
func (c *cluster) dumpLogs() {
	for _, args := range [][]string{
		{"get", "nodes,qv,pv,volumeattachments", "-o", "wide"},
		{"get", "pods,pvc,events", "-A", "-o", "wide"},
		{"-n", namespace, "logs", "-l", "app.kubernetes.io/component=controller", "--all-containers", "--tail=80", "--prefix"},
		{"-n", namespace, "logs", "-l", "app.kubernetes.io/component=node", "--tail=80", "--prefix"},
		{"-n", namespace, "logs", "-l", "app.kubernetes.io/component=datapath", "--all-containers", "--tail=120", "--prefix"},
	} {
		out, err := c.kubectlErr(args...)
		c.t.Logf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	for _, n := range []string{"node1", "node2", "node3"} {
		if b, err := exec.Command("tail", "-n", "30", filepath.Join(c.root, "run", "kubelet-"+n+".log")).Output(); err == nil {
			c.t.Logf("kubelet %s:\n%s", n, b)
		}
	}
}

func (c *cluster) kubectlErr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, c.kubectlBin, append([]string{"--kubeconfig", c.kubeconfig}, args...)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

func (c *cluster) kubectl(args ...string) string {
	c.t.Helper()
	out, err := c.kubectlErr(args...)
	if err != nil {
		c.t.Fatal(err)
	}
	return out
}

// apply applies a manifest.
func (c *cluster) apply(t *testing.T, manifest string) {
	t.Helper()
	cmd := exec.Command(c.kubectlBin, "--kubeconfig", c.kubeconfig, "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(manifest)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply: %v\n%s\n%s", err, out, manifest)
	}
}

func (c *cluster) installChart() {
	t := c.t
	repo := filepath.Join(c.dir, "..", "..")
	c.quorumctl = filepath.Join(t.TempDir(), "quorumctl")
	cmd := exec.Command("go", "build", "-o", c.quorumctl, "./cmd/quorumctl")
	cmd.Dir = repo
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build quorumctl: %v\n%s", err, out)
	}
	c.certs = filepath.Join(t.TempDir(), "tls")
	args := []string{"gen-certs"}
	for _, ip := range nodeIPs {
		args = append(args, "--host", ip)
	}
	if out, err := exec.Command(c.quorumctl, append(args, c.certs)...).CombinedOutput(); err != nil {
		t.Fatalf("quorumctl gen-certs: %v\n%s", err, out)
	}
	c.kubectl("create", "namespace", namespace)
	c.kubectl("-n", namespace, "create", "secret", "generic", "quorum-tls", "--from-file="+c.certs)

	// A scrub pass every few seconds, so ScrubRepairsFifoVolume sees one
	// within the test.
	c.helm(t, "install", "quorum-csi", c.chart(), "--set", "tls.secretName=quorum-tls", "--set", "image.pullPolicy=Never",
		"--set", "datapath.scrubInterval=5s", "--wait", "--timeout", "4m")
	// Every node's plugin registered with its kubelet.
	c.poll(t, "three CSINodes with quorum.csi.dev", 2*time.Minute, func() bool {
		out, err := c.kubectlErr("get", "csinode", "-o", "jsonpath={.items[*].spec.drivers[*].name}")
		return err == nil && strings.Count(out, "quorum.csi.dev") == 3
	})
}

// chart is the chart's folder in this tree.
func (c *cluster) chart() string { return filepath.Join(c.dir, "..", "..", "charts", "quorum-csi") }

// helm runs helm against the cluster in the driver's namespace and
// returns what it printed.
func (c *cluster) helm(t *testing.T, args ...string) string {
	t.Helper()
	bin := os.Getenv("QUORUM_TOOLS_BIN")
	if bin == "" {
		bin = "/var/cache/quorum-csi/tools"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "helm"), append(args, "--kubeconfig", c.kubeconfig, "--namespace", namespace)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		c.dumpLogs()
		t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// poll calls ok every half second until it holds, failing t after
// timeout.
func (c *cluster) poll(t *testing.T, what string, timeout time.Duration, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(timeout); !ok(); time.Sleep(500 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
	}
}

// qv reads a QuorumVolume.
func (c *cluster) qv(t *testing.T, name string) *v1alpha1.QuorumVolume {
	t.Helper()
	out, err := c.kubectlErr("get", "qv", name, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var qv v1alpha1.QuorumVolume
	if err := json.Unmarshal([]byte(out), &qv); err != nil {
		t.Fatalf("QuorumVolume %s: %v", name, err)
	}
	return &qv
}

// waitQV polls a QuorumVolume until ok holds.
func (c *cluster) waitQV(t *testing.T, name, what string, timeout time.Duration, ok func(*v1alpha1.QuorumVolume) bool) *v1alpha1.QuorumVolume {
	t.Helper()
	var qv *v1alpha1.QuorumVolume
	c.poll(t, "QuorumVolume "+name+": "+what, timeout, func() bool {
		qv = c.qv(t, name)
		return ok(qv)
	})
	return qv
}

// volumeOf returns the QuorumVolume behind a bound PVC.
func (c *cluster) volumeOf(t *testing.T, pvc string) string {
	t.Helper()
	pv := strings.TrimSpace(c.kubectl("-n", appNamespace, "get", "pvc", pvc, "-o", "jsonpath={.spec.volumeName}"))
	return strings.TrimSpace(c.kubectl("get", "pv", pv, "-o", "jsonpath={.spec.csi.volumeHandle}"))
}

// replicaImages returns the host paths of a volume's replica images, one
// per node that holds one (the agents' DATA/<volume>/<replica>.img).
func (c *cluster) replicaImages(t *testing.T, qv *v1alpha1.QuorumVolume) map[string]string {
	t.Helper()
	images := map[string]string{}
	for _, r := range qv.Status.Replicas {
		images[r.Node] = filepath.Join(c.root, "nodes", r.Node, "var-lib-quorum-csi", "replicas", qv.Name, r.Name+".img")
	}
	return images
}

// sameReplicas fails t unless every replica image of the (detached)
// volume holds the same bytes.
func (c *cluster) sameReplicas(t *testing.T, qv *v1alpha1.QuorumVolume) {
	t.Helper()
	sums := map[string]string{}
	for node, img := range c.replicaImages(t, qv) {
		out := testutil.Run(t, "sha256sum", img)
		sums[node] = strings.Fields(out)[0]
	}
	if len(sums) != int(qv.Spec.Replicas) {
		t.Fatalf("found %d replica images, want %d: %v", len(sums), qv.Spec.Replicas, sums)
	}
	var first string
	for node, s := range sums {
		if first == "" {
			first = s
		} else if s != first {
			t.Fatalf("replicas differ: %v (node %s)", sums, node)
		}
	}
	t.Logf("replicas of %s identical: sha256 %s on %d nodes", qv.Name, first[:16], len(sums))
}

// metrics scrapes a node plugin's Prometheus endpoint.
func metrics(t *testing.T, node string) string {
	t.Helper()
	// A node cut off must fail the scrape, not hang the test.
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://" + nodeIPs[node] + ":9809/metrics")
	if err != nil {
		t.Fatalf("metrics of %s: %v", node, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("metrics of %s: %v", node, err)
	}
	return string(b)
}

// scrapeController scrapes the controller's Prometheus endpoint, from
// inside the network of its node: pod addresses are not routed to this
// machine.
func (c *cluster) scrapeController(t *testing.T) string {
	t.Helper()
	pod := c.kubectl("-n", namespace, "get", "pod", "-l", "app.kubernetes.io/component=controller",
		"-o", "jsonpath={.items[0].spec.nodeName} {.items[0].status.podIP}")
	node, ip, _ := strings.Cut(strings.TrimSpace(pod), " ")
	out, err := exec.Command("ip", "netns", "exec", "qe-"+node, "curl", "-sSf", "-m", "10", "http://"+ip+":8080/metrics").CombinedOutput()
	if err != nil {
		t.Fatalf("metrics of the controller (%s on %s): %v\n%s", ip, node, err, out)
	}
	return string(out)
}

// monitoringSeries checks the chart's dashboard and alerts against the
// running driver: every series they look at is in the scrape of the
// controller or of node's data path, which serves an attached volume
// that has had a replica fail.
func (c *cluster) monitoringSeries(t *testing.T, node string) {
	t.Helper()
	rendered := c.helm(t, append([]string{"template", "quorum-csi", c.chart(), "--kube-version", "v1.37.2", "--set", "tls.secretName=quorum-tls"}, chart.MonitoringOn...)...)
	exprs, err := chart.MonitoringExprs(rendered)
	if err != nil {
		t.Fatal(err)
	}
	scraped := map[string]bool{}
	for _, m := range []string{c.scrapeController(t), metrics(t, node)} {
		for _, l := range strings.Split(m, "\n") {
			// A sample: NAME{LABELS} VALUE or NAME VALUE.
			if i := strings.IndexAny(l, "{ "); i > 0 && !strings.HasPrefix(l, "#") {
				scraped[l[:i]] = true
			}
		}
	}
	names := map[string]bool{}
	for _, e := range exprs {
		ns, err := e.SeriesNames()
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range ns {
			names[n] = true
			if !scraped[n] {
				t.Errorf("%s looks at %s, which neither the controller nor %s's data path exports now", e.Where, n, node)
			}
		}
	}
	if !t.Failed() {
		t.Logf("the dashboard's and alerts' %d expressions look at %d series, all scraped from the controller and %s", len(exprs), len(names), node)
	}
}

// pod returns a pod manifest running the app image's shell script on
// node, with the PVC claim mounted at /data (Filesystem) or given as
// /dev/xvda (Block).
func pod(name, node, claim string, block bool, script string) string {
	vol := "volumeMounts: [{name: data, mountPath: /data}]"
	if block {
		vol = "volumeDevices: [{name: data, devicePath: /dev/xvda}]"
	}
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: %s}
spec:
  nodeSelector: {kubernetes.io/hostname: %s}
  terminationGracePeriodSeconds: 5
  restartPolicy: Never
  containers:
  - name: app
    image: %s
    imagePullPolicy: Never
    command: [sh, -c, %q]
    %s
  volumes: [{name: data, persistentVolumeClaim: {claimName: %s}}]
`, name, appNamespace, node, appImage, script, vol, claim)
}

func pvc(name, class, size string, block bool) string {
	mode := "Filesystem"
	if block {
		mode = "Block"
	}
	return fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: %s, namespace: %s}
spec:
  accessModes: [ReadWriteOnce]
  volumeMode: %s
  storageClassName: %s
  resources: {requests: {storage: %s}}
`, name, appNamespace, mode, class, size)
}

// waitPod waits until the pod reaches phase (Running, Succeeded).
func (c *cluster) waitPod(t *testing.T, name, phase string, timeout time.Duration) {
	t.Helper()
	c.poll(t, "pod "+name+" "+phase, timeout, func() bool {
		out, _ := c.kubectlErr("-n", appNamespace, "get", "pod", name, "-o", "jsonpath={.status.phase}")
		if out == "Failed" && phase != "Failed" {
			logs, _ := c.kubectlErr("-n", appNamespace, "logs", name)
			t.Fatalf("pod %s failed:\n%s", name, logs)
		}
		return out == phase
	})
}

func (c *cluster) deletePod(t *testing.T, name string) {
	t.Helper()
	c.kubectl("-n", appNamespace, "delete", "pod", name, "--wait", "--timeout=120s")
}

// deleteClaim deletes a PVC and waits until its QuorumVolume and the
// replica images are gone.
func (c *cluster) deleteClaim(t *testing.T, claim, volume string, images map[string]string) {
	t.Helper()
	c.kubectl("-n", appNamespace, "delete", "pvc", claim, "--wait", "--timeout=120s")
	c.poll(t, "QuorumVolume "+volume+" deleted", 2*time.Minute, func() bool {
		_, err := c.kubectlErr("get", "qv", volume)
		return err != nil && strings.Contains(err.Error(), "NotFound")
	})
	for node, img := range images {
		if _, err := os.Stat(img); !os.IsNotExist(err) {
			t.Errorf("replica image on %s still there after the PVC was deleted: %s (%v)", node, img, err)
		}
	}
}
