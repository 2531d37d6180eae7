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

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

func ready(qv *v1alpha1.QuorumVolume) bool {
	if qv.Status.Phase != v1alpha1.VolumeReady || len(qv.Status.Replicas) != int(qv.Spec.Replicas) {
		return false
	}
	for _, r := range qv.Status.Replicas {
		if r.State != v1alpha1.ReplicaHealthy {
			return false
		}
	}
	return true
}

// quorumVolumeWithKubectl: a QuorumVolume applied with kubectl alone (no
// PVC) gets its three replicas on three nodes and reaches Ready; kubectl
// get qv shows them; deleting it removes the images.
func (c *cluster) quorumVolumeWithKubectl(t *testing.T) {
	c.apply(t, "apiVersion: quorum.csi.dev/v1alpha1\nkind: QuorumVolume\nmetadata: {name: by-kubectl}\nspec: {size: 64Mi, replicas: 3}\n")
	qv := c.waitQV(t, "by-kubectl", "Ready with 3 healthy replicas", 2*time.Minute, ready)
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
	// Columns by the header's offsets: an empty ATTACHED cell would shift
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
	c.apply(t, pod("reader", "node2", "moves", false, `cd /data && sha256sum -c SUMS && echo VERIFIED; exec sleep 3600`))
	c.waitPod(t, "reader", "Running", 3*time.Minute)
	var logs string
	c.poll(t, "the reader's check", time.Minute, func() bool {
		logs, _ = c.kubectlErr("-n", appNamespace, "logs", "reader")
		return strings.Contains(logs, "VERIFIED") || strings.Contains(logs, "FAILED")
	})
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
	bin := filepath.Join(t.TempDir(), "quorumctl")
	build := exec.Command("go", "build", "-o", bin, "./cmd/quorumctl")
	build.Dir = filepath.Join(c.dir, "..", "..")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build quorumctl: %v\n%s", err, out)
	}
	args := []string{"attach", "--epoch", strconv.FormatInt(epoch, 10), "--frontend", "fuse-loop",
		"--nbd-timeout", "5s", "--state-dir", t.TempDir()}
	for _, r := range qv.Status.Replicas {
		args = append(args, fmt.Sprintf("nbds://%s/%s?tls-certificates=%s", r.Endpoint, qv.Name, c.certs))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
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
		`set -e; i=0; while [ $i -lt 8192 ]; do printf 'quorum-csi block %07d ....................................................................................................................\n' $i; i=$((i+1)); done | head -c 8388608 > /tmp/pattern; `+
			`dd if=/tmp/pattern of=/dev/xvda bs=1M oflag=direct conv=fsync status=none; `+
			`dd if=/dev/xvda of=/tmp/back bs=1M count=8 iflag=direct status=none; cmp /tmp/pattern /tmp/back; `+
			`echo PATTERN $(sha256sum < /tmp/pattern); exec sleep 3600`))
	c.waitPod(t, "raw", "Running", 3*time.Minute)
	var logs string
	c.poll(t, "the pattern read back", time.Minute, func() bool {
		logs, _ = c.kubectlErr("-n", appNamespace, "logs", "raw")
		return strings.Contains(logs, "PATTERN")
	})
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

// nodeCutOff: while fio writes and verifies on a volume attached to node1,
// node3 (which holds a remote replica) is cut off the network: fio goes on
// without an error, the volume turns Degraded with a Warning Event; node3
// comes back, its replica resyncs, the volume is Ready again and the
// replicas are identical.
func (c *cluster) nodeCutOff(t *testing.T) {
	c.apply(t, pvc("fio", "quorum-fifo", "256Mi", false))
	c.apply(t, pod("fio", "node1", "fio", false,
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
	if !ready(qv) {
		t.Fatalf("volume before the cut: phase %s, replicas %+v", qv.Status.Phase, qv.Status.Replicas)
	}

	cut := time.Now()
	c.script(time.Minute, "cluster.sh", "cut", "node3")
	mended := false
	defer func() {
		if !mended {
			c.script(time.Minute, "cluster.sh", "mend", "node3")
		}
	}()
	roundsAtCut := rounds()
	c.waitQV(t, vol, "Degraded", 3*time.Minute, func(qv *v1alpha1.QuorumVolume) bool {
		return qv.Status.Phase == v1alpha1.VolumeDegraded
	})
	t.Logf("Degraded %s after node3 was cut off", time.Since(cut).Round(time.Second))
	c.poll(t, "a Warning Event on the volume", time.Minute, func() bool { return len(c.warnings(t, vol)) > 0 })
	t.Logf("Warning Events on %s: %s", vol, strings.Join(c.warnings(t, vol), "; "))
	c.poll(t, "fio to finish a round with node3 cut off", 3*time.Minute, func() bool { return rounds() > roundsAtCut })

	c.script(time.Minute, "cluster.sh", "mend", "node3")
	mended = true
	back := time.Now()
	c.waitQV(t, vol, "Ready again", 4*time.Minute, ready)
	// Ready comes from the agents; the engine on node1 tells when the
	// resync is done.
	c.poll(t, "node1's engine to report three healthy replicas", 3*time.Minute, func() bool {
		m := metrics(t, "node1")
		return countSeries(m, "quorum_replica_state", `state="healthy",volume="`+vol+`"} 1`) == 3
	})
	t.Logf("node3 back: Ready and resynced %s after the mend", time.Since(back).Round(time.Second))
	m := metrics(t, "node1")
	for _, want := range []string{
		`quorum_volume_bytes_total{op="write",volume="` + vol + `"}`,
		`quorum_events_total{event="REPORT_BAD"`,
		`quorum_volume_request_seconds_bucket{op="write"`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("node1's metrics lack %s", want)
		}
	}

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
func (c *cluster) warnings(t *testing.T, vol string) []string {
	t.Helper()
	out, err := c.kubectlErr("get", "events.events.k8s.io", "-A", "--field-selector", "type=Warning", "-o", "json")
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
	var ws []string
	for _, e := range list.Items {
		if e.Regarding.Kind == "QuorumVolume" && e.Regarding.Name == vol {
			ws = append(ws, e.Reason+": "+e.Note)
		}
	}
	return ws
}
