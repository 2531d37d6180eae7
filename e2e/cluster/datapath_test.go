package cluster

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// The data path scenarios: a pod writes and verifies with fio on its PVC
// the whole time while the node's software is killed, restarted or
// upgraded under it. Each asserts 0 fio errors, a pod that never
// restarted, no I/O error in the kernel log, identical replicas, and a
// clean node once the pod and its claim are gone; each reports the
// longest I/O stall the pod saw.

// fioScript runs 64 MiB rounds of randwrite with crc32c verification on
// /data until /data/STOP exists, and beside them a probe that times a
// small direct, synced write every 50 ms and records each one's
// milliseconds: the stall a user of the volume sees.
const fioScript = `probe() { while [ ! -e /data/STOP ]; do t0=$(date +%s%N); ` +
	`dd if=/dev/zero of=/data/probe bs=4k count=1 oflag=direct conv=notrunc,fsync status=none || echo PROBE-ERROR; ` +
	`t1=$(date +%s%N); echo $(( (t1-t0)/1000000 )) >> /tmp/probe.ms; sleep 0.05; done; }; probe & ` +
	`i=0; while [ ! -e /data/STOP ]; do i=$((i+1)); ` +
	`fio --name=verify --filename=/data/fio.dat --size=64M --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio ` +
	`--direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 > /tmp/fio.out 2>&1 || { echo "FIO-FAILED in round $i"; cat /tmp/fio.out; exit 1; }; ` +
	`grep -q 'err= 0' /tmp/fio.out || { echo "FIO-FAILED in round $i"; cat /tmp/fio.out; exit 1; }; ` +
	`echo "round $i ok"; done; wait; echo FIO-DONE; exec sleep 3600`

// fioRun is a pod running fioScript on a PVC of its own.
type fioRun struct {
	c         *cluster
	name      string
	node      string
	vol       string
	uid       string
	device    string // the volume's device on node, e.g. loop3
	kernelLog int    // lines of the kernel log before the run
}

func (c *cluster) startFio(t *testing.T, name, node string) *fioRun {
	t.Helper()
	c.apply(t, pvc(name, "quorum-fifo", "256Mi", false))
	c.apply(t, pod(name, node, name, false, fioScript))
	c.waitPod(t, name, "Running", 3*time.Minute)
	r := &fioRun{c: c, name: name, node: node}
	r.vol = c.volumeOf(t, name)
	r.device = c.stagedDevice(t, node, r.vol)
	r.kernelLog = len(kernelLog(t, r.device))
	r.uid = strings.TrimSpace(c.kubectl("-n", appNamespace, "get", "pod", name, "-o", "jsonpath={.metadata.uid}"))
	r.waitRounds(t, 1, 6*time.Minute)
	if qv := c.qv(t, r.vol); !qvtest.Ready(qv) {
		t.Fatalf("volume %s before the test: phase %s, replicas %+v", r.vol, qv.Status.Phase, qv.Status.Replicas)
	}
	return r
}

func (r *fioRun) logs(t *testing.T) string {
	t.Helper()
	logs, _ := r.c.kubectlErr("-n", appNamespace, "logs", r.name)
	if strings.Contains(logs, "FIO-FAILED") {
		t.Fatalf("fio failed:\n%s", logs)
	}
	return logs
}

func (r *fioRun) rounds(t *testing.T) int { return strings.Count(r.logs(t), " ok\n") }

// waitRounds waits until fio finished n rounds in all.
func (r *fioRun) waitRounds(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	r.c.poll(t, fmt.Sprintf("fio round %d on %s", n, r.name), timeout, func() bool { return r.rounds(t) >= n })
}

// finish stops fio and checks everything the scenarios promise: 0 fio
// errors, the pod never restarted, no new I/O error in the kernel log,
// identical replicas, and nothing left on the node once the pod and its
// claim are deleted. It reports the longest stall of the probe.
func (r *fioRun) finish(t *testing.T) {
	t.Helper()
	c := r.c
	uid := strings.TrimSpace(c.kubectl("-n", appNamespace, "get", "pod", r.name, "-o", "jsonpath={.metadata.uid}"))
	restarts := strings.TrimSpace(c.kubectl("-n", appNamespace, "get", "pod", r.name, "-o", "jsonpath={.status.containerStatuses[0].restartCount}"))
	if uid != r.uid || restarts != "0" {
		t.Errorf("pod %s restarted: uid %s (was %s), %s container restarts", r.name, uid, r.uid, restarts)
	}
	c.kubectl("-n", appNamespace, "exec", r.name, "--", "touch", "/data/STOP")
	var logs string
	c.poll(t, "fio to stop", 5*time.Minute, func() bool {
		logs = r.logs(t)
		return strings.Contains(logs, "FIO-DONE")
	})
	probe := c.kubectl("-n", appNamespace, "exec", r.name, "--", "cat", "/tmp/probe.ms")
	if strings.Contains(logs, "PROBE-ERROR") {
		t.Errorf("the probe's direct writes failed:\n%s", logs)
	}
	maxMS, n := 0, 0
	for _, f := range strings.Fields(probe) {
		ms, err := strconv.Atoi(f)
		if err == nil {
			maxMS, n = max(maxMS, ms), n+1
		}
	}
	t.Logf("fio: %d rounds of 64 MiB randwrite with verify, 0 errors; stall: max %d ms over %d probe writes", strings.Count(logs, " ok\n"), maxMS, n)
	if bad := kernelLog(t, r.device)[r.kernelLog:]; len(bad) > 0 {
		t.Errorf("I/O errors in the kernel log during the run:\n%s", strings.Join(bad, "\n"))
	}
	c.deletePod(t, r.name)
	qv := c.qv(t, r.vol)
	images := c.replicaImages(t, qv)
	c.sameReplicas(t, qv)
	c.deleteClaim(t, r.name, r.vol, images)
	c.nodeClean(t, r.node, r.vol)
}

// stagedDevice is the device (its name, loop3) the data path on node
// serves the volume as, from its record.
func (c *cluster) stagedDevice(t *testing.T, node, vol string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(c.root, "nodes", node, "run-quorum-csi", "state", "volumes", vol+".json"))
	if err != nil {
		t.Fatalf("the data path's record of %s on %s: %v", vol, node, err)
	}
	var rec struct {
		Device string `json:"device"`
	}
	if err := json.Unmarshal(b, &rec); err != nil || rec.Device == "" {
		t.Fatalf("the data path's record of %s on %s: %v: %s", vol, node, err, b)
	}
	return filepath.Base(rec.Device)
}

// kernelLog returns the kernel's I/O error lines (block layer, ext4)
// about dev since boot; callers compare counts. Other devices are left
// out: the kernel log is the machine's, and other tests may fail I/O on
// their own devices on purpose.
func kernelLog(t *testing.T, dev string) []string {
	t.Helper()
	out, err := exec.Command("dmesg").Output()
	if err != nil {
		t.Fatalf("dmesg: %v", err)
	}
	var bad []string
	ours := regexp.MustCompile(`\b` + regexp.QuoteMeta(dev) + `\b`)
	for _, l := range strings.Split(string(out), "\n") {
		if !ours.MatchString(l) {
			continue
		}
		if strings.Contains(l, "I/O error") || strings.Contains(l, "EXT4-fs error") || strings.Contains(l, "Buffer I/O") ||
			strings.Contains(l, "EXT4-fs warning") && strings.Contains(l, "I/O") {
			bad = append(bad, l)
		}
	}
	return bad
}

// nodeClean fails t if the node still holds anything of the volume: a
// data path record or device state file, a mount, a loop device over a
// FUSE file.
func (c *cluster) nodeClean(t *testing.T, node, vol string) {
	t.Helper()
	state := filepath.Join(c.root, "nodes", node, "run-quorum-csi", "state")
	c.poll(t, "the node's records and device state of "+vol+" gone", time.Minute, func() bool {
		left, _ := filepath.Glob(filepath.Join(state, "*"+vol+"*"))
		rec, _ := filepath.Glob(filepath.Join(state, "volumes", vol+".json"))
		return len(left)+len(rec) == 0
	})
	if out, _ := exec.Command("findmnt", "-rn", "-o", "TARGET,SOURCE").Output(); bytes.Contains(out, []byte(vol)) {
		t.Errorf("mounts of %s left:\n%s", vol, out)
	}
}

// hostPID returns the host PID of the process running binary for node:
// the nodes' pods share this machine's kernel, and each data path and
// node plugin has its node's name in NODE_NAME.
func hostPID(t *testing.T, node, binary string) int {
	t.Helper()
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	var found []int
	for _, d := range dirs {
		cmd, err := os.ReadFile(filepath.Join(d, "cmdline"))
		if err != nil || filepath.Base(string(bytes.SplitN(cmd, []byte{0}, 2)[0])) != binary {
			continue
		}
		env, err := os.ReadFile(filepath.Join(d, "environ"))
		if err != nil || !slices.ContainsFunc(bytes.Split(env, []byte{0}), func(v []byte) bool { return string(v) == "NODE_NAME="+node }) {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(d))
		found = append(found, pid)
	}
	if len(found) != 1 {
		t.Fatalf("%d %s processes of %s: %v", len(found), binary, node, found)
	}
	return found[0]
}

// containerRestarts returns the restart count of container in the pod of
// the component's DaemonSet on node.
func (c *cluster) containerRestarts(t *testing.T, component, node, container string) int {
	t.Helper()
	out := c.kubectl("-n", namespace, "get", "pod", "-l", "app.kubernetes.io/component="+component,
		"--field-selector", "spec.nodeName="+node, "-o",
		`jsonpath={range .items[*].status.containerStatuses[?(@.name=="`+container+`")]}{.restartCount}{"\n"}{end}`)
	n, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("restarts of %s/%s on %s: %q", component, container, node, out)
	}
	return n
}

// nodePods lists the names of the node plugin and data path pods.
func (c *cluster) nodePods(t *testing.T) []string {
	t.Helper()
	return strings.Fields(c.kubectl("-n", namespace, "get", "pods", "-l", "app.kubernetes.io/component in (node,datapath)",
		"-o", "jsonpath={.items[*].metadata.name}"))
}

// waitDaemonSetReady waits until the DaemonSet's pods are all updated
// and ready.
func (c *cluster) waitDaemonSetReady(t *testing.T, ds string) {
	t.Helper()
	if _, err := c.kubectlErr("-n", namespace, "rollout", "status", "daemonset/"+ds, "--timeout=5m"); err != nil {
		t.Fatal(err)
	}
}

// killAndWait kills the process of binary on node with SIGKILL and waits
// until its container is back and the DaemonSet ready.
func (c *cluster) killAndWait(t *testing.T, node, component, container, binary string) {
	t.Helper()
	before := c.containerRestarts(t, component, node, container)
	pid := hostPID(t, node, binary)
	if err := exec.Command("kill", "-KILL", strconv.Itoa(pid)).Run(); err != nil {
		t.Fatalf("kill %s (%d): %v", binary, pid, err)
	}
	killed := time.Now()
	c.poll(t, container+" restarted on "+node, 2*time.Minute, func() bool {
		return c.containerRestarts(t, component, node, container) > before
	})
	c.waitDaemonSetReady(t, "quorum-csi-"+component)
	t.Logf("killed %s (pid %d) on %s; its container was back and ready after %s", binary, pid, node, time.Since(killed).Round(100*time.Millisecond))
}

// nodePluginKilled: the CSI node plugin on the pod's node is killed;
// the data path, in its own pod, serves on.
func (c *cluster) nodePluginKilled(t *testing.T) {
	r := c.startFio(t, "plugkill", "node1")
	at := r.rounds(t)
	c.killAndWait(t, "node1", "node", "node", "quorum-node")
	r.waitRounds(t, at+1, 6*time.Minute)
	r.finish(t)
}

// dataPathKilled: the data path on the pod's node is killed with
// SIGKILL; its restarted container takes the device back (the FUSE
// connection kept by the holder, or ublk user recovery), recovers the
// write intent and has the kernel resend what was in flight.
func (c *cluster) dataPathKilled(t *testing.T) {
	r := c.startFio(t, "dpkill", "node1")
	at := r.rounds(t)
	c.killAndWait(t, "node1", "datapath", "datapath", "quorum-datapath")
	if qv := c.qv(t, r.vol); len(qv.Status.Attachments) != 1 {
		t.Fatalf("attachments after the kill: %+v", qv.Status.Attachments)
	}
	r.waitRounds(t, at+1, 6*time.Minute)
	c.waitQV(t, r.vol, "DataPathReady True on node1", time.Minute, func(qv *v1alpha1.QuorumVolume) bool {
		return attachmentReady(qv, "node1") == "True"
	})
	r.finish(t)
}

// attachmentReady is the DataPathReady condition's status of node's
// attachment ("" if none).
func attachmentReady(qv *v1alpha1.QuorumVolume, node string) string {
	for _, a := range qv.Status.Attachments {
		if a.Node != node {
			continue
		}
		for _, cond := range a.Conditions {
			if cond.Type == v1alpha1.AttachmentDataPathReady {
				return string(cond.Status)
			}
		}
	}
	return ""
}

// nodeRolloutRestart: kubectl rollout restart of both node DaemonSets
// across all three nodes, as an operator does after changing a setting.
func (c *cluster) nodeRolloutRestart(t *testing.T) {
	r := c.startFio(t, "rollout", "node1")
	at := r.rounds(t)
	before := c.nodePods(t)
	began := time.Now()
	c.kubectl("-n", namespace, "rollout", "restart", "daemonset/quorum-csi-node", "daemonset/quorum-csi-datapath")
	c.waitDaemonSetReady(t, "quorum-csi-node")
	c.waitDaemonSetReady(t, "quorum-csi-datapath")
	// The old pods may take a moment to go once the new ones are ready.
	var after []string
	c.poll(t, "six new node pods", 2*time.Minute, func() bool {
		after = c.nodePods(t)
		return len(after) == 6 && !slices.ContainsFunc(after, func(p string) bool { return slices.Contains(before, p) })
	})
	t.Logf("both DaemonSets rolled over three nodes in %s", time.Since(began).Round(time.Second))
	r.waitRounds(t, at+1, 6*time.Minute)
	r.finish(t)
}

// helmUpgrade: helm upgrade to node images with another tag: both
// DaemonSets roll, the data path hands over to its successor on each
// node.
func (c *cluster) helmUpgrade(t *testing.T) {
	const upgraded = "quorum-csi/node:upgrade"
	for n := range nodeIPs {
		sock := filepath.Join(c.root, "nodes", n, "run-containerd", "containerd.sock")
		out, err := exec.Command("ctr", "-a", sock, "-n", "k8s.io", "images", "tag", "--force",
			"docker.io/quorum-csi/node:dev", "docker.io/"+upgraded).CombinedOutput()
		if err != nil {
			t.Fatalf("tag the node image on %s: %v\n%s", n, err, out)
		}
	}
	r := c.startFio(t, "upgrade", "node1")
	at := r.rounds(t)
	began := time.Now()
	c.helm(t, "upgrade", "quorum-csi", c.chart(), "--reuse-values", "--set", "image.node="+upgraded, "--wait", "--timeout", "6m")
	c.waitDaemonSetReady(t, "quorum-csi-node")
	c.waitDaemonSetReady(t, "quorum-csi-datapath")
	// The old pods may take a moment to go once the new ones are ready;
	// poll fails the test if one still runs the old image after that.
	c.poll(t, "node pods running "+upgraded+" only", 2*time.Minute, func() bool {
		images := c.kubectl("-n", namespace, "get", "pods", "-l", "app.kubernetes.io/component in (node,datapath)",
			"-o", "jsonpath={.items[*].spec.containers[*].image}")
		return strings.Count(images, upgraded) == strings.Count(images, "quorum-csi/node:")
	})
	t.Logf("helm upgrade rolled both DaemonSets in %s", time.Since(began).Round(time.Second))
	logs := c.kubectl("-n", namespace, "logs", "-l", "app.kubernetes.io/component=datapath", "-c", "datapath", "--tail=-1")
	if !strings.Contains(logs, "asking it to hand over") {
		t.Errorf("no data path asked its predecessor to hand over:\n%s", logs)
	}
	r.waitRounds(t, at+1, 6*time.Minute)
	r.finish(t)
}

// scrubRepairsFifoVolume: a replica of a fifo volume (whose reads never
// vote) is corrupted behind the engine's back; the data path's
// background scrub finds it, reports it (REPORT_BAD) and repairs it.
func (c *cluster) scrubRepairsFifoVolume(t *testing.T) {
	c.apply(t, pvc("scrub", "quorum-fifo", "64Mi", true))
	c.apply(t, pod("scrub", "node1", "scrub", true,
		`set -e; seq -f 'quorum-csi scrub %0110.0f' 0 65535 > /tmp/pattern; `+
			`dd if=/tmp/pattern of=/dev/xvda bs=1M oflag=direct conv=fsync status=none; echo WRITTEN; exec sleep 3600`))
	c.waitPod(t, "scrub", "Running", 3*time.Minute)
	c.waitLog(t, "scrub", "WRITTEN", time.Minute)
	vol := c.volumeOf(t, "scrub")
	qv := c.qv(t, vol)
	images := c.replicaImages(t, qv)
	var victim string
	for node := range images {
		if node != "node1" {
			victim = node
			break
		}
	}
	// 4 KiB of garbage at 1 MiB in one remote replica: fifo reads go to
	// node1's own replica and would never notice.
	garbage := bytes.Repeat([]byte{0xde, 0xad, 0xbe, 0xef}, 1024)
	f, err := os.OpenFile(images[victim], os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt(garbage, 1<<20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("corrupt the replica on %s: %v", victim, err)
	}
	corrupted := time.Now()
	c.poll(t, "a REPORT_BAD Warning Event from the scrub", 3*time.Minute, func() bool {
		for _, w := range c.warnings(t, vol) {
			if strings.HasPrefix(w, "REPORT_BAD") {
				return true
			}
		}
		return false
	})
	t.Logf("the scrub found the corruption on %s after %s: %s", victim, time.Since(corrupted).Round(time.Second), strings.Join(c.warnings(t, vol), "; "))
	c.deletePod(t, "scrub")
	c.sameReplicas(t, c.qv(t, vol))
	c.deleteClaim(t, "scrub", vol, images)
}
