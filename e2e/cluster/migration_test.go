package cluster

import (
	"encoding/json"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// The live-migration scenarios run QEMU as KubeVirt's virt-launcher does,
// without KubeVirt: a pod on the source node runs a TCG guest whose
// virtio disk is a ReadWriteMany Block PVC; a pod on the target node
// starts the same QEMU with -incoming defer on the same PVC (the second
// publish: a Standby attachment); QMP migrate-incoming and migrate move
// the VM; deleting the source pod unpublishes it. The guest
// (e2e/guest/tests/test-migrate.sh) writes and verifies with fio the
// whole time and prints a line per round on the console, the pod's log.

const (
	vmImage  = "quorum-csi/e2e-vm:dev"
	qmpPort  = 4445
	migrPort = 4444
	// vmClass reads fifo, the node-local replica first.
	vmClass = "quorum-fifo"
)

var (
	roundRE  = regexp.MustCompile(`MIGRATE round (\d+) ok`)
	vmFailRE = regexp.MustCompile(`MIGRATE-FAILED.*`)
)

// vmPod returns a pod running the VM image's QEMU on node with claim as
// its disk, opened as KubeVirt opens a Block volume (host_device,
// O_DIRECT, native AIO); QMP listens on the node's address. incoming
// makes it a migration target that waits for migrate-incoming.
func vmPod(name, node, claim string, incoming bool) string {
	args := []string{"-accel", "tcg", "-cpu", "max,-cx16", "-smp", "1", "-m", "512",
		"-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio",
		"-kernel", "/guest/vmlinuz", "-initrd", "/guest/initramfs.cpio.gz",
		"-append", "console=ttyS0 quiet panic=-1 test=migrate",
		"-blockdev", "driver=host_device,node-name=disk0,filename=/dev/xvda,cache.direct=on,aio=native",
		"-device", "virtio-blk-pci,drive=disk0",
		"-qmp", fmt.Sprintf("tcp:%s:%d,server=on,wait=off", nodeIPs[node], qmpPort)}
	if incoming {
		args = append(args, "-incoming", "defer")
	}
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = strconv.Quote(a)
	}
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: %s}
spec:
  nodeSelector: {kubernetes.io/hostname: %s}
  hostNetwork: true
  terminationGracePeriodSeconds: 5
  restartPolicy: Never
  containers:
  - name: qemu
    image: %s
    imagePullPolicy: Never
    args: [%s]
    volumeDevices: [{name: disk, devicePath: /dev/xvda}]
  volumes: [{name: disk, persistentVolumeClaim: {claimName: %s}}]
`, name, appNamespace, node, vmImage, strings.Join(quoted, ", "), claim)
}

// rwxBlockPVC is a ReadWriteMany Block claim, what KubeVirt needs to
// live-migrate a VM.
func rwxBlockPVC(name string) string {
	return strings.Replace(pvc(name, vmClass, "256Mi", true), "[ReadWriteOnce]", "[ReadWriteMany]", 1)
}

// vm is a QEMU pod and its QMP connection.
type vm struct {
	c    *cluster
	name string
	node string
	qmp  *qmp
}

// startVM starts a VM pod and connects to its QMP; a source VM (not
// incoming) must finish a first round of guest writes.
func (c *cluster) startVM(t *testing.T, name, node, claim string, incoming bool) *vm {
	t.Helper()
	// A scenario that failed halfway leaves no QEMU behind on the
	// node's QMP and migration ports for the next one.
	t.Cleanup(func() {
		if _, err := c.kubectlErr("-n", appNamespace, "delete", "pod", name, "--ignore-not-found", "--wait", "--timeout=120s"); err != nil {
			t.Errorf("delete VM pod %s: %v", name, err)
		}
	})
	c.apply(t, vmPod(name, node, claim, incoming))
	c.waitPod(t, name, "Running", 3*time.Minute)
	v := &vm{c: c, name: name, node: node, qmp: dialQMP(t, net.JoinHostPort(nodeIPs[node], strconv.Itoa(qmpPort)))}
	if !incoming {
		v.waitRounds(t, 1, 4*time.Minute)
	}
	return v
}

// rounds returns the numbers of the guest's finished rounds this pod's
// console printed, failing t on a failed one.
func (v *vm) rounds(t *testing.T) []int {
	t.Helper()
	logs, _ := v.c.kubectlErr("-n", appNamespace, "logs", v.name)
	if m := vmFailRE.FindString(logs); m != "" {
		t.Fatalf("the guest in %s: %s\n%s", v.name, m, logs)
	}
	var rounds []int
	for _, m := range roundRE.FindAllStringSubmatch(logs, -1) {
		n, _ := strconv.Atoi(m[1])
		rounds = append(rounds, n)
	}
	return rounds
}

// waitRounds waits until this pod's console printed n rounds.
func (v *vm) waitRounds(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	v.c.poll(t, fmt.Sprintf("%d guest rounds in %s", n, v.name), timeout, func() bool { return len(v.rounds(t)) >= n })
}

func (v *vm) status(t *testing.T) string {
	t.Helper()
	var st struct{ Status string }
	v.qmp.run(t, "query-status", nil, &st)
	return st.Status
}

// stop pauses the guest (QEMU drains and flushes the disk) and deletes
// the pod, which unpublishes the volume on its node.
func (v *vm) stop(t *testing.T) {
	t.Helper()
	if v.status(t) == "running" {
		v.qmp.run(t, "stop", nil, nil)
	}
	v.qmp.close()
	v.c.deletePod(t, v.name)
}

// waitAttachments waits until the volume's attachments are exactly want
// (node: role).
func (c *cluster) waitAttachments(t *testing.T, vol string, want map[string]v1alpha1.AttachmentRole) *v1alpha1.QuorumVolume {
	t.Helper()
	return c.waitQV(t, vol, fmt.Sprintf("attachments %v", want), 2*time.Minute, func(qv *v1alpha1.QuorumVolume) bool {
		if len(qv.Status.Attachments) != len(want) {
			return false
		}
		for _, a := range qv.Status.Attachments {
			role := a.Role
			if role == "" {
				role = v1alpha1.AttachmentActive
			}
			if w, ok := want[a.Node]; !ok || w != role {
				return false
			}
		}
		return true
	})
}

// attachment returns the volume's attachment on node.
func attachment(t *testing.T, qv *v1alpha1.QuorumVolume, node string) v1alpha1.Attachment {
	t.Helper()
	for _, a := range qv.Status.Attachments {
		if a.Node == node {
			return a
		}
	}
	t.Fatalf("volume %s has no attachment on %s: %+v", qv.Name, node, qv.Status.Attachments)
	return v1alpha1.Attachment{}
}

// migrationOpts shape one migration.
type migrationOpts struct {
	// cancel issues migrate_cancel once the migration is under way.
	cancel bool
	// during runs while the migration is under way.
	during func()
}

// migrate moves the VM src to a new pod named name on node, as
// virt-launcher does, and checks each step: the target stages as a
// Standby while the source's guest goes on writing; the migration
// completes (or is cancelled, with opts.cancel); the pod that is left
// runs the guest on, its rounds following the other's; the other pod is
// deleted and the volume has one Active attachment again, with the Event
// that says which way it went. It returns the VM that runs.
func (c *cluster) migrate(t *testing.T, src *vm, vol, claim, name, node string, opts migrationOpts) *vm {
	t.Helper()
	began := time.Now()
	dst := c.startVM(t, name, node, claim, true)
	qv := c.waitAttachments(t, vol, map[string]v1alpha1.AttachmentRole{
		src.node: v1alpha1.AttachmentActive, node: v1alpha1.AttachmentStandby})
	srcEpoch := attachment(t, qv, src.node).Epoch
	// The Standby took nothing over: the source's guest still writes.
	src.waitRounds(t, len(src.rounds(t))+1, 2*time.Minute)

	dst.qmp.run(t, "migrate-incoming", map[string]any{"uri": fmt.Sprintf("tcp:%s:%d", nodeIPs[node], migrPort)}, nil)
	// A cancelled migration must not finish first: 512 MiB of guest RAM
	// at 16 MiB/s takes long enough.
	bandwidth := int64(1 << 30)
	if opts.cancel || opts.during != nil {
		bandwidth = 16 << 20
	}
	src.qmp.run(t, "migrate-set-parameters", map[string]any{"max-bandwidth": bandwidth}, nil)
	src.qmp.run(t, "migrate", map[string]any{"uri": fmt.Sprintf("tcp:%s:%d", nodeIPs[node], migrPort)}, nil)
	started := time.Now()
	if opts.during != nil {
		opts.during()
		src.qmp.run(t, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1 << 30)}, nil)
	}
	if opts.cancel {
		c.poll(t, "the migration to be under way", time.Minute, func() bool { return src.migrationStatus(t) == "active" })
		time.Sleep(time.Second)
		src.qmp.run(t, "migrate_cancel", nil, nil)
	}
	var status string
	c.poll(t, "the migration to end", 5*time.Minute, func() bool {
		status = src.migrationStatus(t)
		return status == "completed" || status == "failed" || status == "cancelled"
	})
	want := "completed"
	if opts.cancel {
		want = "cancelled"
	}
	if status != want {
		t.Fatalf("migration %s -> %s: %s, want %s", src.node, node, status, want)
	}
	t.Logf("migration %s -> %s %s in %s", src.node, node, status, time.Since(started).Round(time.Millisecond))

	runs, gone := dst, src
	event := "MigrationConfirmed"
	if opts.cancel {
		runs, gone, event = src, dst, "MigrationRolledBack"
	}
	if st := runs.status(t); st != "running" {
		t.Fatalf("the VM in %s is %s after the migration, want running", runs.name, st)
	}
	before := src.rounds(t)
	runs.waitRounds(t, len(runs.rounds(t))+2, 3*time.Minute)
	if !opts.cancel {
		// The round in flight at the switchover finishes on the target
		// (or, when its line was still in the serial port, the next).
		last, first := before[len(before)-1], dst.rounds(t)[0]
		if first != last+1 && first != last+2 {
			t.Errorf("the guest's rounds: %d last on %s, %d first on %s; want them to follow", last, src.node, first, node)
		}
	}
	gone.qmp.close()
	c.deletePod(t, gone.name)
	qv = c.waitAttachments(t, vol, map[string]v1alpha1.AttachmentRole{runs.node: v1alpha1.AttachmentActive})
	c.poll(t, "Event "+event, time.Minute, func() bool { return len(c.events(t, vol, "Normal", event)) > 0 })
	if !opts.cancel && attachment(t, qv, node).Epoch <= srcEpoch {
		t.Errorf("epoch %d on %s after the migration, %d on %s before: want it to grow", attachment(t, qv, node).Epoch, node, srcEpoch, src.node)
	}
	t.Logf("%s (%s): %s runs the VM alone, %s after the target pod was applied", event, gone.node, runs.node, time.Since(began).Round(time.Second))
	return runs
}

func (v *vm) migrationStatus(t *testing.T) string {
	t.Helper()
	var st struct{ Status string }
	v.qmp.run(t, "query-migrate", nil, &st)
	return st.Status
}

// finishVM stops the VM and checks the volume: the guest never failed a
// round, the replicas are identical; then deletes the claim.
func (c *cluster) finishVM(t *testing.T, v *vm, vol, claim string) {
	t.Helper()
	v.rounds(t)
	v.stop(t)
	qv := c.qv(t, vol)
	images := c.replicaImages(t, qv)
	c.sameReplicas(t, qv)
	c.deleteClaim(t, claim, vol, images)
}

// liveMigration: node1 -> node2. Afterwards node2 holds the only
// attachment and node1's epoch is fenced on the replicas.
func (c *cluster) liveMigration(t *testing.T) {
	c.apply(t, rwxBlockPVC("vm"))
	src := c.startVM(t, "vm-a", "node1", "vm", false)
	vol := c.volumeOf(t, "vm")
	qv := c.waitAttachments(t, vol, map[string]v1alpha1.AttachmentRole{"node1": v1alpha1.AttachmentActive})
	epoch1 := attachment(t, qv, "node1").Epoch
	dst := c.migrate(t, src, vol, "vm", "vm-b", "node2", migrationOpts{})
	c.fencedAttach(t, c.qv(t, vol), epoch1)
	c.finishVM(t, dst, vol, "vm")
}

// liveMigrationCancelled: migrate_cancel: the source runs on, the target
// is unpublished, nothing diverges.
func (c *cluster) liveMigrationCancelled(t *testing.T) {
	c.apply(t, rwxBlockPVC("vm-cancel"))
	src := c.startVM(t, "vmc-a", "node1", "vm-cancel", false)
	vol := c.volumeOf(t, "vm-cancel")
	runs := c.migrate(t, src, vol, "vm-cancel", "vmc-b", "node2", migrationOpts{cancel: true})
	c.finishVM(t, runs, vol, "vm-cancel")
}

// liveMigrationReplicaCut: the node of the third replica (neither the
// source's nor the target's) is cut off while the migration runs: the
// migration completes, the guest sees no error, the volume is Degraded
// then, after the mend, Ready with the replicas identical again.
func (c *cluster) liveMigrationReplicaCut(t *testing.T) {
	ctrlNode := strings.TrimSpace(c.kubectl("-n", namespace, "get", "pod", "-l", "app.kubernetes.io/component=controller",
		"-o", "jsonpath={.items[0].spec.nodeName}"))
	// The controller's node is never cut (it would stop the controller).
	cutNode, srcNode, dstNode := "node3", "node1", "node2"
	if ctrlNode == "node3" {
		cutNode, srcNode, dstNode = "node1", "node2", "node3"
	}
	t.Logf("controller on %s; VM %s -> %s; cutting off %s during the migration", ctrlNode, srcNode, dstNode, cutNode)
	c.apply(t, rwxBlockPVC("vm-cut"))
	src := c.startVM(t, "vmx-a", srcNode, "vm-cut", false)
	vol := c.volumeOf(t, "vm-cut")
	if qv := c.qv(t, vol); !qvtest.Ready(qv) || len(c.replicaImages(t, qv)) != 3 {
		t.Fatalf("volume before the cut: phase %s, replicas %+v", qv.Status.Phase, qv.Status.Replicas)
	}
	mended := false
	defer func() {
		if !mended {
			c.script(time.Minute, "cluster.sh", "mend", cutNode)
		}
	}()
	dst := c.migrate(t, src, vol, "vm-cut", "vmx-b", dstNode, migrationOpts{during: func() {
		c.script(time.Minute, "cluster.sh", "cut", cutNode)
	}})
	c.waitQV(t, vol, "Degraded", 3*time.Minute, func(qv *v1alpha1.QuorumVolume) bool {
		return qv.Status.Phase == v1alpha1.VolumeDegraded
	})
	dst.waitRounds(t, len(dst.rounds(t))+1, 3*time.Minute)
	c.script(time.Minute, "cluster.sh", "mend", cutNode)
	mended = true
	c.waitQV(t, vol, "Ready again", 4*time.Minute, qvtest.Ready)
	c.poll(t, dstNode+"'s engine to report three healthy replicas", 3*time.Minute, func() bool {
		return countSeries(metrics(t, dstNode), "quorum_replica_state", `state="healthy",volume="`+vol+`"} 1`) == 3
	})
	c.finishVM(t, dst, vol, "vm-cut")
}

// liveMigrationBackAndForth: node1 -> node2 -> node1, twice.
func (c *cluster) liveMigrationBackAndForth(t *testing.T) {
	c.apply(t, rwxBlockPVC("vm-hops"))
	v := c.startVM(t, "vmh-0", "node1", "vm-hops", false)
	vol := c.volumeOf(t, "vm-hops")
	for i, node := range []string{"node2", "node1", "node2", "node1"} {
		v = c.migrate(t, v, vol, "vm-hops", fmt.Sprintf("vmh-%d", i+1), node, migrationOpts{})
	}
	c.finishVM(t, v, vol, "vm-hops")
}

// qmp is a client of the QEMU Machine Protocol (QEMU's
// docs/interop/qmp-spec.rst): JSON commands, one reply each, with
// asynchronous events between them.
type qmp struct {
	conn net.Conn
	dec  *json.Decoder
}

// dialQMP connects, waiting for QEMU to listen, and leaves capability
// negotiation.
func dialQMP(t *testing.T, addr string) *qmp {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err == nil {
			q := &qmp{conn: conn, dec: json.NewDecoder(conn)}
			var greeting struct{ QMP json.RawMessage }
			if err := conn.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
				t.Fatal(err)
			}
			if err := q.dec.Decode(&greeting); err != nil || greeting.QMP == nil {
				t.Fatalf("QMP %s: no greeting: %v", addr, err)
			}
			q.run(t, "qmp_capabilities", nil, nil)
			return q
		}
		if time.Now().After(deadline) {
			t.Fatalf("QMP %s: %v", addr, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// run executes a command and decodes its return value into result (when
// not nil); an error reply fails t.
func (q *qmp) run(t *testing.T, command string, args, result any) {
	t.Helper()
	if err := q.conn.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	msg := map[string]any{"execute": command}
	if args != nil {
		msg["arguments"] = args
	}
	if err := json.NewEncoder(q.conn).Encode(msg); err != nil {
		t.Fatalf("QMP %s: %v", command, err)
	}
	for {
		var reply struct {
			Return json.RawMessage
			Error  *struct{ Class, Desc string }
			Event  string
		}
		if err := q.dec.Decode(&reply); err != nil {
			t.Fatalf("QMP %s: %v", command, err)
		}
		switch {
		case reply.Event != "":
			continue
		case reply.Error != nil:
			t.Fatalf("QMP %s: %s: %s", command, reply.Error.Class, reply.Error.Desc)
		case result != nil:
			if err := json.Unmarshal(reply.Return, result); err != nil {
				t.Fatalf("QMP %s: %v: %s", command, err, reply.Return)
			}
		}
		return
	}
}

func (q *qmp) close() { q.conn.Close() }
