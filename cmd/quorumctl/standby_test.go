package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/alignbuf"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

// migration is a live migration's two attaches of three replicas behind
// one `quorumctl serve`: the source with epoch 1 and a --standby target
// with epoch 2, each with its own state folder.
type migration struct {
	dir      string
	ps       []string
	srv      *server
	src, tgt *attached
}

func startMigration(t *testing.T, size string, srcArgs ...string) *migration {
	t.Helper()
	m := &migration{dir: kernelTest(t, "fio")}
	m.ps = replicas(t, m.dir, size, "a.img", "b.img", "c.img")
	m.srv = serve(t, nil, "--listen", "127.0.0.1:0", "--export", "a="+m.ps[0], "--export", "b="+m.ps[1], "--export", "c="+m.ps[2])
	uris := []string{m.srv.uri("a"), m.srv.uri("b"), m.srv.uri("c")}
	m.src = attach(t, filepath.Join(m.dir, "src"), append(append([]string{"--epoch", "1"}, srcArgs...), uris...)...)
	return m
}

func (m *migration) standby(t *testing.T) {
	t.Helper()
	uris := []string{m.srv.uri("a"), m.srv.uri("b"), m.srv.uri("c")}
	m.tgt = attach(t, filepath.Join(m.dir, "tgt"), append([]string{"--standby", "--epoch", "2", "--read-pattern", "fifo"}, uris...)...)
}

// state is what `quorumctl status` says of attach a: standby, active
// or fenced, and its scrub's pass.
func (m *migration) state(t *testing.T, a *attached) (state string, scrubPass int) {
	t.Helper()
	out := mustQuorumctl(t, "status", "--json", "--state-dir", a.stateDir, m.ps[0])
	var rep struct {
		Standby, Fenced bool
		Scrub           struct{ Pass int }
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("status output %q: %v", out, err)
	}
	switch {
	case rep.Standby:
		return "standby", rep.Scrub.Pass
	case rep.Fenced:
		return "fenced", rep.Scrub.Pass
	}
	return "active", rep.Scrub.Pass
}

// states says which of the migration's attaches is what.
func (m *migration) states(t *testing.T) string {
	t.Helper()
	src, _ := m.state(t, m.src)
	tgt, _ := m.state(t, m.tgt)
	return "source " + src + ", target " + tgt
}

// detachFenced ends the fenced source (it cannot mark the replicas
// clean, so it exits 1), detaches the target and stops the server,
// expects the replicas identical and returns their content.
func (m *migration) detachFenced(t *testing.T) []byte {
	t.Helper()
	m.src.cmd.Process.Signal(syscall.SIGTERM)
	<-m.src.exited
	m.tgt.stop(syscall.SIGTERM)
	m.srv.stop()
	assertIdentical(t, m.ps...)
	b, err := os.ReadFile(m.ps[0])
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// epochs are the replicas' persisted epochs.
func (m *migration) epochs(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, p := range m.ps {
		b, err := os.ReadFile(replica.EpochPath(p))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, strings.TrimSpace(string(b)))
	}
	return out
}

// readDirect reads n bytes at off of dev, bypassing the page cache.
func readDirect(t *testing.T, dev string, off int64, n int) []byte {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignbuf.Make(n, 4096)
	if _, err := f.ReadAt(buf, off); err != nil {
		t.Fatalf("read %s at %d: %v", dev, off, err)
	}
	return buf
}

// TestStandbyMigration: while fio writes and verifies through the source
// attach, a --standby attach of the same replicas with a newer epoch
// comes up: the source's writes keep succeeding (fio: no error), the
// replicas' epoch and metadata stay the source's, and the standby reads
// the source's data. The standby's first write activates it: the
// source's next write fails as fenced, and the replicas, identical
// after both detach, hold the source's data from before the activation
// and the standby's from after it.
func TestStandbyMigration(t *testing.T) {
	m := startMigration(t, "256M")
	metaBefore, err := replica.ReadMeta(m.ps[1])
	if err != nil {
		t.Fatal(err)
	}
	wait := fioVerify(t, m.src.dev, "64M")
	time.Sleep(time.Second)
	m.standby(t)
	if st := m.states(t); st != "source active, target standby" {
		t.Fatalf("with the target attached: %s", st)
	}
	res := wait()
	t.Logf("fio through the source with a standby attached: %s", strings.Join(strings.Split(res, ";")[:10], ";"))
	// A block the source writes now, past fio's range.
	const srcBlock, tgtBlock, fencedBlock = 100 << 8, 101 << 8, 102 << 8
	if err := ddDirect(m.src.dev, 0xab, srcBlock, 16); err != nil {
		t.Fatalf("source write with a standby attached: %v", err)
	}
	if got := readDirect(t, m.tgt.dev, srcBlock*4096, 16*4096); !bytes.Equal(got, bytes.Repeat([]byte{0xab}, 16*4096)) {
		t.Fatal("the standby does not read what the source wrote")
	}
	if a, b := sha256.Sum256(readDirect(t, m.tgt.dev, 0, 64<<20)), sha256.Sum256(readDirect(t, m.src.dev, 0, 64<<20)); a != b {
		t.Fatal("the standby reads other data than the source in fio's range")
	}
	if e := m.epochs(t); strings.Join(e, ",") != "1,1,1" {
		t.Fatalf("replicas' epochs with a standby attached: %v, want the source's 1", e)
	}
	if mm, err := replica.ReadMeta(m.ps[1]); err != nil || mm != metaBefore {
		t.Fatalf("the standby changed the metadata: %+v (%v), was %+v", mm, err, metaBefore)
	}
	if _, pass := m.state(t, m.tgt); pass != 0 {
		t.Errorf("a standby scrubbed: pass %d", pass)
	}

	start := time.Now()
	if err := ddDirect(m.tgt.dev, 2, tgtBlock, 16); err != nil {
		t.Fatalf("standby's first write: %v\n%s", err, m.tgt.logs())
	}
	t.Logf("the standby's first write, activation included, took %s", time.Since(start))
	err = ddDirect(m.src.dev, 9, fencedBlock, 1)
	if err == nil {
		t.Fatal("the source could still write after the standby's activation")
	}
	t.Logf("the source's write after the activation: %v", err)
	if st := m.states(t); st != "source fenced, target active" {
		t.Errorf("after the activation: %s", st)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, pass := m.state(t, m.tgt); pass == 0; _, pass = m.state(t, m.tgt) {
		if time.Now().After(deadline) {
			t.Fatal("no scrub pass within 10s of the activation")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if e := m.epochs(t); strings.Join(e, ",") != "2,2,2" {
		t.Errorf("replicas' epochs after the activation: %v, want 2", e)
	}
	logs := m.tgt.logs()
	if !strings.Contains(logs, `"msg":"standby activated`) {
		t.Errorf("the target's log does not say it was activated:\n%s", logs)
	}
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "standby activated") || strings.Contains(l, "crash recovery done") {
			t.Logf("target: %s", l)
		}
	}
	b := m.detachFenced(t)
	for blk, want := range map[int]byte{srcBlock: 0xab, tgtBlock: 2, fencedBlock: 0} {
		if got := b[blk*4096 : (blk+16)*4096]; !bytes.Equal(got[:4096], bytes.Repeat([]byte{want}, 4096)) {
			t.Errorf("replicas at block %d hold %d, want %d", blk, got[0], want)
		}
	}
}

// TestStandbyCancelled: a standby detached without a write (a cancelled
// migration) leaves everything to the source: the epochs stay 1, the
// source writes on and detaches cleanly, the replicas end identical.
// What the kubelet does to every Block volume's device on the target (a
// loop device over it, whose setup flushes it) and a flush of its own
// leave it a standby.
func TestStandbyCancelled(t *testing.T) {
	m := startMigration(t, "64M")
	m.standby(t)
	readDirect(t, m.tgt.dev, 0, 1<<20)
	out, err := exec.Command("losetup", "-f", "--show", m.tgt.dev).CombinedOutput()
	if err != nil {
		t.Fatalf("loop device over the standby: %v: %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	f, err := os.Open(m.tgt.dev)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("flush the standby: %v", err)
	}
	f.Close()
	// The detach waits for the device's users, the loop device one.
	if out, err := exec.Command("losetup", "-d", loop).CombinedOutput(); err != nil {
		t.Fatalf("losetup -d %s: %v: %s", loop, err, out)
	}
	if st := m.states(t); st != "source active, target standby" {
		t.Fatalf("after a loop device over the standby and a flush: %s", st)
	}
	m.tgt.stop(syscall.SIGTERM)
	if e := m.epochs(t); strings.Join(e, ",") != "1,1,1" {
		t.Fatalf("epochs after a standby came and went: %v, want 1", e)
	}
	if err := ddDirect(m.src.dev, 5, 0, 16); err != nil {
		t.Fatalf("source write after the standby left: %v", err)
	}
	m.src.stop(syscall.SIGTERM)
	m.srv.stop()
	assertIdentical(t, m.ps...)
}

// TestStandbyRace: the source and the standby write at the same moment,
// each its own blocks, one synchronous write after the other. Exactly
// one holds the replicas afterwards (the standby: its epoch is newer;
// the source's writes fail from the fence on), and every write
// acknowledged to either is on the replicas.
func TestStandbyRace(t *testing.T) {
	m := startMigration(t, "64M")
	const blocks = 256
	// The source's write intent already covers its blocks, as in a
	// running VM, so that its writes are quick from the start.
	if err := ddDirect(m.src.dev, 1, 0, blocks); err != nil {
		t.Fatal(err)
	}
	m.standby(t)
	acked := map[string][]bool{"source": make([]bool, blocks), "standby": make([]bool, blocks)}
	firstErr := map[string]error{}
	start := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	for who, a := range map[string]*attached{"source": m.src, "standby": m.tgt} {
		base := int64(0)
		if who == "standby" {
			base = blocks * 4096
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := os.OpenFile(a.dev, os.O_WRONLY|syscall.O_DIRECT|syscall.O_DSYNC, 0)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			buf := alignbuf.Make(4096, 4096)
			<-start
			for n := range blocks {
				for i := range buf {
					buf[i] = byte(n%250 + 1)
				}
				if _, err := f.WriteAt(buf, base+int64(n)*4096); err != nil {
					mu.Lock()
					firstErr[who] = err
					mu.Unlock()
					return
				}
				acked[who][n] = true
			}
		}()
	}
	close(start)
	wg.Wait()
	count := func(who string) (n int) {
		for _, ok := range acked[who] {
			if ok {
				n++
			}
		}
		return n
	}
	t.Logf("acknowledged: source %d (then %v), standby %d (then %v), of %d each", count("source"), firstErr["source"], count("standby"), firstErr["standby"], blocks)
	if count("standby") != blocks {
		t.Fatalf("the standby, the newer epoch, lost the race\n%s", m.tgt.logs())
	}
	if err := ddDirect(m.src.dev, 9, 2*blocks, 1); err == nil {
		t.Fatal("the source could write after the race")
	}
	if st := m.states(t); st != "source fenced, target active" {
		t.Errorf("after the race: %s", st)
	}
	b := m.detachFenced(t)
	for who, base := range map[string]int{"source": 0, "standby": blocks * 4096} {
		for n, ok := range acked[who] {
			if ok && b[base+n*4096] != byte(n%250+1) {
				t.Errorf("%s's acknowledged write %d is lost", who, n)
			}
		}
	}
	if b[2*blocks*4096] == 9 {
		t.Error("the source's write after the race landed")
	}
}
