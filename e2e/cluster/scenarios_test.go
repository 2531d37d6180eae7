package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// quorumVolumeWithKubectl: a QuorumVolume applied with kubectl alone (no
// PVC) gets its three replicas on three nodes and reaches Ready; kubectl
// get qv shows them; deleting it removes the images.
func (c *cluster) quorumVolumeWithKubectl(t *testing.T) {
	c.apply(t, "apiVersion: quorum.csi.dev/v1alpha1\nkind: QuorumVolume\nmetadata: {name: by-kubectl}\nspec: {size: 64Mi, replicas: 3}\n")
	qv := c.waitQV(t, "by-kubectl", "Ready with 3 healthy replicas", 2*time.Minute, qvtest.Ready)
	nodes := map[string]bool{}
	for _, r := range qv.Status.Replicas {
		nodes[r.Node] = true
	}
	if len(nodes) != 3 {
		t.Errorf("replicas on %d distinct nodes, want 3: %+v", len(nodes), qv.Status.Replicas)
	}
	images := c.replicaImages(t, qv)
	for node, img := range images {
		fi, err := os.Stat(img)
		if err != nil || fi.Size() != 64<<20 {
			t.Errorf("replica image on %s: %v (size %v), want 64 MiB", node, err, fi)
		}
	}
	table := c.kubectl("get", "qv", "by-kubectl")
	t.Logf("kubectl get qv:\n%s", table)
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if len(lines) != 2 {
		t.Fatalf("kubectl get qv printed %d lines, want a header and a row", len(lines))
	}
	// Columns by the header's offsets: an empty ACTIVE cell would shift
	// a split on spaces.
	row := map[string]string{}
	starts := regexp.MustCompile(`\S+`).FindAllStringIndex(lines[0], -1)
	for i, st := range starts {
		end := len(lines[1])
		if i+1 < len(starts) {
			end = min(starts[i+1][0], end)
		}
		if st[0] < end {
			row[lines[0][st[0]:st[1]]] = strings.TrimSpace(lines[1][st[0]:end])
		}
	}
	for col, want := range map[string]string{"NAME": "by-kubectl", "READY": "3/3", "PHASE": "Ready"} {
		if row[col] != want {
			t.Errorf("kubectl get qv: column %s is %q, want %q", col, row[col], want)
		}
	}
	c.kubectl("delete", "qv", "by-kubectl", "--wait", "--timeout=120s")
	for node, img := range images {
		if _, err := os.Stat(filepath.Dir(img)); !os.IsNotExist(err) {
			t.Errorf("replica folder on %s still there after delete: %v", node, err)
		}
	}
}

// filesystemPVCMoves: files written with their checksums by a pod on
// node1 read back the same in a pod on node2; the attachment moved with a
// greater epoch, and node1's epoch can no longer take the replicas.
func (c *cluster) filesystemPVCMoves(t *testing.T) {
	c.apply(t, pvc("moves", "quorum-fifo", "256Mi", false))
	c.apply(t, pod("writer", "node1", "moves", false,
		`set -e; cd /data; for i in $(seq 1 16); do head -c 1048576 /dev/urandom > f$i; done; `+
			`sha256sum f* > SUMS; sync; touch DONE; exec sleep 3600`))
	c.waitPod(t, "writer", "Running", 3*time.Minute)
	c.poll(t, "the writer's files", time.Minute, func() bool {
		_, err := c.kubectlErr("-n", appNamespace, "exec", "writer", "--", "test", "-e", "/data/DONE")
		return err == nil
	})
	sums := c.kubectl("-n", appNamespace, "exec", "writer", "--", "cat", "/data/SUMS")
	vol := c.volumeOf(t, "moves")
	before := c.qv(t, vol)
	if len(before.Status.Attachments) != 1 || before.Status.Attachments[0].Node != "node1" {
		t.Fatalf("attachments while the writer runs: %+v, want node1", before.Status.Attachments)
	}
	epoch1 := before.Status.Attachments[0].Epoch

	c.deletePod(t, "writer")
	c.apply(t, pod("reader", "node2", "moves", false, `set -e; cd /data; sha256sum -c SUMS; echo VERIFIED; exec sleep 3600`))
	c.waitPod(t, "reader", "Running", 3*time.Minute)
	logs := c.waitLog(t, "reader", "VERIFIED", time.Minute)
	if !strings.Contains(logs, "VERIFIED") || strings.Count(logs, ": OK") != 16 {
		t.Fatalf("node2 read different files than node1 wrote:\nSUMS:\n%s\nsha256sum -c:\n%s", sums, logs)
	}
	after := c.qv(t, vol)
	if len(after.Status.Attachments) != 1 || after.Status.Attachments[0].Node != "node2" {
		t.Fatalf("attachments after the move: %+v, want node2", after.Status.Attachments)
	}
	epoch2 := after.Status.Attachments[0].Epoch
	if epoch2 <= epoch1 {
		t.Errorf("epoch went from %d to %d, want it to grow", epoch1, epoch2)
	}
	t.Logf("16 files verified on node2; attachment node1 (epoch %d) -> node2 (epoch %d)", epoch1, epoch2)
	c.fencedAttach(t, after, epoch1)

	c.deletePod(t, "reader")
	images := c.replicaImages(t, after)
	c.sameReplicas(t, c.qv(t, vol))
	c.deleteClaim(t, "moves", vol, images)
}

// fencedAttach: an attach with node1's old epoch, over the same three
// replica servers with the nodes' client certificate, is refused as
// fenced before it can write.
func (c *cluster) fencedAttach(t *testing.T, qv *v1alpha1.QuorumVolume, epoch int64) {
	t.Helper()
	args := []string{"attach", "--epoch", strconv.FormatInt(epoch, 10), "--frontend", "fuse-loop",
		"--nbd-timeout", "5s", "--state-dir", t.TempDir()}
	for _, r := range qv.Status.Replicas {
		args = append(args, fmt.Sprintf("nbds://%s/%s?tls-certificates=%s", r.Endpoint, qv.Name, c.certs))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, c.quorumctl, args...).CombinedOutput()
	var exit *exec.ExitError
	switch {
	case ctx.Err() != nil:
		t.Fatalf("an attach with the old epoch %d was not refused within a minute:\n%s", epoch, out)
	case !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(string(out), "fenced"):
		t.Fatalf("attach with the old epoch %d: %v, want exit 1 naming the fence:\n%s", epoch, err, out)
	}
	t.Logf("an attach with node1's epoch %d is refused: %s", epoch, lastLine(string(out)))
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// blockPVC: a pod writes a pattern to the raw device and reads it back;
// every replica holds it.
func (c *cluster) blockPVC(t *testing.T) {
	c.apply(t, pvc("raw", "quorum-quorum", "64Mi", true))
	c.apply(t, pod("raw", "node2", "raw", true,
		`set -e; seq -f 'quorum-csi block %0110.0f' 0 65535 > /tmp/pattern; test $(stat -c %s /tmp/pattern) = 8388608; `+
			`dd if=/tmp/pattern of=/dev/xvda bs=1M oflag=direct conv=fsync status=none; `+
			`dd if=/dev/xvda of=/tmp/back bs=1M count=8 iflag=direct status=none; cmp /tmp/pattern /tmp/back; `+
			`echo PATTERN $(sha256sum < /tmp/pattern); exec sleep 3600`))
	c.waitPod(t, "raw", "Running", 3*time.Minute)
	logs := c.waitLog(t, "raw", "PATTERN", time.Minute)
	m := regexp.MustCompile(`PATTERN ([0-9a-f]{64})`).FindStringSubmatch(logs)
	if m == nil {
		t.Fatalf("pod raw: %s", logs)
	}
	vol := c.volumeOf(t, "raw")
	c.deletePod(t, "raw")
	qv := c.qv(t, vol)
	images := c.replicaImages(t, qv)
	for node, img := range images {
		out, err := exec.Command("sh", "-c", "head -c 8388608 "+img+" | sha256sum").Output()
		if err != nil || strings.Fields(string(out))[0] != m[1] {
			t.Errorf("replica on %s: first 8 MiB %s (%v), want the pattern's %s", node, out, err, m[1])
		}
	}
	c.sameReplicas(t, qv)
	c.deleteClaim(t, "raw", vol, images)
}

// nodeCutOff: while fio writes and verifies on a volume attached to one
// node, another node (which holds a remote replica) is cut off the
// network: fio goes on without an error, the volume turns Degraded with a
// Warning Event; the node comes back, its replica resyncs, the volume is
// Ready again and the replicas are identical. The node cut off is not the
// one running the controller, which would stop the controller too (it
// would move only after the pod eviction timeout, minutes later).
func (c *cluster) nodeCutOff(t *testing.T) {
	ctrlNode := strings.TrimSpace(c.kubectl("-n", namespace, "get", "pod", "-l", "app.kubernetes.io/component=controller",
		"-o", "jsonpath={.items[0].spec.nodeName}"))
	cutNode, podNode := "node3", "node1"
	if ctrlNode == "node3" {
		cutNode = "node2"
	}
	t.Logf("controller on %s; fio on %s; cutting off %s", ctrlNode, podNode, cutNode)
	c.apply(t, pvc("fio", "quorum-fifo", "256Mi", false))
	c.apply(t, pod("fio", podNode, "fio", false,
		`i=0; while [ ! -e /data/STOP ]; do i=$((i+1)); `+
			`fio --name=verify --filename=/data/fio.dat --size=64M --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio `+
			`--direct=1 --verify=crc32c --verify_fatal=1 --do_verify=1 > /tmp/fio.out 2>&1 || { echo "FIO-FAILED in round $i"; cat /tmp/fio.out; exit 1; }; `+
			`grep -q 'err= 0' /tmp/fio.out || { echo "FIO-FAILED in round $i"; cat /tmp/fio.out; exit 1; }; `+
			`echo "round $i ok"; done; echo FIO-DONE; exec sleep 3600`))
	c.waitPod(t, "fio", "Running", 3*time.Minute)
	rounds := func() int {
		logs, _ := c.kubectlErr("-n", appNamespace, "logs", "fio")
		if strings.Contains(logs, "FIO-FAILED") {
			t.Fatalf("fio failed:\n%s", logs)
		}
		return strings.Count(logs, " ok\n")
	}
	c.poll(t, "a first fio round", 3*time.Minute, func() bool { return rounds() >= 1 })
	vol := c.volumeOf(t, "fio")
	qv := c.qv(t, vol)
	if !qvtest.Ready(qv) {
		t.Fatalf("volume before the cut: phase %s, replicas %+v", qv.Status.Phase, qv.Status.Replicas)
	}

	cut := time.Now()
	c.script(time.Minute, "cluster.sh", "cut", cutNode)
	mended := false
	defer func() {
		if !mended {
			c.script(time.Minute, "cluster.sh", "mend", cutNode)
		}
	}()
	roundsAtCut := rounds()
	c.waitQV(t, vol, "Degraded", 3*time.Minute, func(qv *v1alpha1.QuorumVolume) bool {
		return qv.Status.Phase == v1alpha1.VolumeDegraded
	})
	t.Logf("Degraded %s after %s was cut off", time.Since(cut).Round(time.Second), cutNode)
	c.poll(t, "a Warning Event on the volume", time.Minute, func() bool { return len(c.warnings(t, vol)) > 0 })
	t.Logf("Warning Events on %s: %s", vol, strings.Join(c.warnings(t, vol), "; "))
	c.poll(t, "fio to finish a round with "+cutNode+" cut off", 3*time.Minute, func() bool { return rounds() > roundsAtCut })

	c.script(time.Minute, "cluster.sh", "mend", cutNode)
	mended = true
	back := time.Now()
	c.waitQV(t, vol, "Ready again", 4*time.Minute, qvtest.Ready)
	// Ready comes from the agents; the engine on the pod's node tells when
	// the resync is done.
	c.poll(t, podNode+"'s engine to report three healthy replicas", 3*time.Minute, func() bool {
		m := metrics(t, podNode)
		return countSeries(m, "quorum_replica_state", `state="healthy",volume="`+vol+`"} 1`) == 3
	})
	t.Logf("%s back: Ready and resynced %s after the mend", cutNode, time.Since(back).Round(time.Second))
	m := metrics(t, podNode)
	for _, want := range []string{
		`quorum_volume_bytes_total{op="write",volume="` + vol + `"}`,
		`quorum_events_total{event="REPORT_BAD"`,
		`quorum_volume_request_seconds_bucket{op="write"`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("%s's metrics lack %s", podNode, want)
		}
	}
	c.monitoringSeries(t, podNode)

	c.kubectl("-n", appNamespace, "exec", "fio", "--", "touch", "/data/STOP")
	var logs string
	c.poll(t, "fio to stop", 5*time.Minute, func() bool {
		logs, _ = c.kubectlErr("-n", appNamespace, "logs", "fio")
		return strings.Contains(logs, "FIO-DONE") || strings.Contains(logs, "FIO-FAILED")
	})
	if strings.Contains(logs, "FIO-FAILED") {
		t.Fatalf("fio:\n%s", logs)
	}
	t.Logf("fio: %d rounds of 64 MiB randwrite with verify, 0 errors", strings.Count(logs, " ok\n"))
	c.deletePod(t, "fio")
	qv = c.qv(t, vol)
	images := c.replicaImages(t, qv)
	c.sameReplicas(t, qv)
	c.deleteClaim(t, "fio", vol, images)
}

// countSeries counts the lines of metric family name that contain part.
func countSeries(metrics, name, part string) int {
	n := 0
	for _, l := range strings.Split(metrics, "\n") {
		if strings.HasPrefix(l, name+"{") && strings.Contains(l, part) {
			n++
		}
	}
	return n
}

// warnings lists the reasons and notes of the Warning Events about a
// QuorumVolume.
func (c *cluster) warnings(t *testing.T, vol string) []string { return c.events(t, vol, "Warning", "") }

// events lists the reasons and notes of the Events of type typ about a
// QuorumVolume, only those for reason unless it is empty.
func (c *cluster) events(t *testing.T, vol, typ, reason string) []string {
	t.Helper()
	out, err := c.kubectlErr("get", "events.events.k8s.io", "-A", "--field-selector", "type="+typ, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Items []struct {
			Reason    string `json:"reason"`
			Note      string `json:"note"`
			Regarding struct {
				Kind string `json:"kind"`
				Name string `json:"name"`
			} `json:"regarding"`
		} `json:"items"`
	}
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatal(err)
	}
	var es []string
	for _, e := range list.Items {
		if e.Regarding.Kind == "QuorumVolume" && e.Regarding.Name == vol && (reason == "" || e.Reason == reason) {
			es = append(es, e.Reason+": "+e.Note)
		}
	}
	return es
}

// pvcExpansion: a PVC's request is raised while no pod uses it (the
// driver expands offline); the next pod sees the filesystem grown, its
// files intact, and the claim reports the new capacity.
func (c *cluster) pvcExpansion(t *testing.T) {
	c.apply(t, pvc("grows", "quorum-fifo", "128Mi", false))
	df := `df -k /data | awk 'NR==2 {print "SIZE", $2}'`
	c.apply(t, pod("small", "node1", "grows", false, `set -e; head -c 4194304 /dev/urandom > /data/keep; sha256sum /data/keep > /data/keep.sum; sync; `+df+`; exec sleep 3600`))
	c.waitPod(t, "small", "Running", 3*time.Minute)
	before := c.podSize(t, "small")
	vol := c.volumeOf(t, "grows")
	c.deletePod(t, "small")

	c.kubectl("-n", appNamespace, "patch", "pvc", "grows", "--type=merge", "-p", `{"spec":{"resources":{"requests":{"storage":"256Mi"}}}}`)
	c.poll(t, "the PV to grow to 256Mi and the claim to wait for the node", 3*time.Minute, func() bool {
		pv := strings.TrimSpace(c.kubectl("-n", appNamespace, "get", "pvc", "grows", "-o", "jsonpath={.spec.volumeName}"))
		capacity := c.kubectl("get", "pv", pv, "-o", "jsonpath={.spec.capacity.storage}")
		status := c.kubectl("-n", appNamespace, "get", "pvc", "grows", "-o", "jsonpath={.status.allocatedResourceStatuses.storage}")
		return capacity == "256Mi" && status == "NodeResizePending"
	})
	if size := c.qv(t, vol).Spec.Size.String(); size != "256Mi" {
		t.Errorf("QuorumVolume size %s after the expansion, want 256Mi", size)
	}

	c.apply(t, pod("big", "node2", "grows", false, `set -e; sha256sum -c /data/keep.sum; `+df+`; exec sleep 3600`))
	c.waitPod(t, "big", "Running", 3*time.Minute)
	after := c.podSize(t, "big")
	if after < before+100<<10 {
		t.Errorf("filesystem of %d KiB after the expansion, %d KiB before: want about 128 MiB more", after, before)
	}
	c.poll(t, "the claim to report 256Mi", 2*time.Minute, func() bool {
		return c.kubectl("-n", appNamespace, "get", "pvc", "grows", "-o", "jsonpath={.status.capacity.storage}") == "256Mi"
	})
	t.Logf("filesystem grew from %d to %d KiB; the 4 MiB file reads back", before, after)
	c.deletePod(t, "big")
	qv := c.qv(t, vol)
	images := c.replicaImages(t, qv)
	c.sameReplicas(t, qv)
	c.deleteClaim(t, "grows", vol, images)
}

// podSize waits for the SIZE line a pod's script prints and returns it
// (KiB).
func (c *cluster) podSize(t *testing.T, name string) int64 {
	t.Helper()
	m := regexp.MustCompile(`SIZE (\d+)`).FindStringSubmatch(c.waitLog(t, name, "SIZE", time.Minute))
	n, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// waitLog waits until a pod's log holds want and returns the log; a pod
// that ended (its scripts run with set -e) fails t with its log.
func (c *cluster) waitLog(t *testing.T, pod, want string, timeout time.Duration) string {
	t.Helper()
	var logs string
	c.poll(t, "pod "+pod+" to log "+want, timeout, func() bool {
		logs, _ = c.kubectlErr("-n", appNamespace, "logs", pod)
		if strings.Contains(logs, want) {
			return true
		}
		if phase, _ := c.kubectlErr("-n", appNamespace, "get", "pod", pod, "-o", "jsonpath={.status.phase}"); phase == "Failed" || phase == "Succeeded" {
			t.Fatalf("pod %s ended (%s) without logging %q:\n%s", pod, phase, want, logs)
		}
		return false
	})
	return logs
}
