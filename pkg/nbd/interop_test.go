package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

// Interop with real peers: QEMU's and libnbd's tools read and write
// through our server (exporting real replica files), and our client runs
// against qemu-nbd and nbdkit, with nbdkit's error and delay filters
// injecting faults. The tools are userland programs; tests skip without
// them unless QUORUM_CI=1, where they fail.

// The interfaces line up: a replica file exports as it is, and the
// client is an engine child.
var (
	_ Backend      = (*replica.File)(nil)
	_ BlockSizer   = (*replica.File)(nil)
	_ quorum.Child = (*Client)(nil)
	_ ExtentLister = (*FileBackend)(nil)
)

const interopSize = 64 << 20

// replicaExport creates and opens a replica image and wraps it with its
// allocation map.
func replicaExport(t *testing.T) (*FileBackend, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "replica.img")
	if err := replica.Create([]string{path}, interopSize); err != nil {
		t.Fatal(err)
	}
	r, err := replica.Open(path)
	if err != nil && strings.Contains(err.Error(), "direct I/O") {
		testutil.Unavailable(t, "needs a TMPDIR on a filesystem with direct I/O: "+err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	fb, err := WithFileExtents(r, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		fb.Close()
		r.Close()
	})
	return fb, path
}

func nbdURI(ts *testServer, export string) string {
	return fmt.Sprintf("nbd://%s/%s", ts.Addr, export)
}

// run runs a tool and returns its combined output, failing on error.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// qemuIO runs qemu-io commands against an image and checks that every
// pattern verification passed.
func qemuIO(t *testing.T, args []string, cmds ...string) string {
	t.Helper()
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := run(t, "qemu-io", args...)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io: %s", out)
	}
	return out
}

func fileBytes(t *testing.T, path string, off, n int64) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestInteropQemuIOThroughOurServer(t *testing.T) {
	testutil.RequireTools(t, "qemu-io")
	checkNoGoroutines(t)
	fb, path := replicaExport(t)
	ts := startServer(t, "tcp", ServerConfig{Exports: []Export{{Name: "vol", Backend: fb}}})
	qemuIO(t, []string{"-f", "raw", nbdURI(ts, "vol")},
		"write -P 0xab 0 1M",
		"write -P 0xcd 1M 64k",
		// Unaligned: QEMU honours our 512-byte minimum with its own
		// read-modify-write.
		"write -P 0x11 1000 10",
		"read -P 0xab 0 1000",
		"read -P 0x11 1000 10",
		"read -P 0xab 1010 1047566",
		"read -P 0xcd 1M 64k",
		"write -z 2M 1M",
		"read -P 0 2M 1M",
		"write -P 0x77 3M 64k",
		"discard 3M 64k",
		"read -P 0 3M 64k",
		"aio_write -P 0x55 8M 64k",
		"aio_write -P 0x66 9M 64k",
		"aio_flush",
		"read -P 0x55 8M 64k",
		"read -P 0x66 9M 64k",
		"flush",
	)
	// The bytes are in the replica file, where the engine will find them.
	if got := fileBytes(t, path, 1000, 10); !bytes.Equal(got, bytes.Repeat([]byte{0x11}, 10)) {
		t.Fatalf("replica file at 1000: %x", got)
	}
	if got := fileBytes(t, path, 1<<20, 64<<10); !bytes.Equal(got, bytes.Repeat([]byte{0xcd}, 64<<10)) {
		t.Fatal("replica file at 1M does not hold qemu-io's write")
	}
	if got := fileBytes(t, path, 3<<20, 64<<10); !bytes.Equal(got, make([]byte, 64<<10)) {
		t.Fatal("discarded range does not read as zeroes in the replica file")
	}
}

func TestInteropQemuImgThroughOurServer(t *testing.T) {
	testutil.RequireTools(t, "qemu-img")
	checkNoGoroutines(t)
	fb, path := replicaExport(t)
	ts := startServer(t, "tcp", ServerConfig{Exports: []Export{{Name: "vol", Backend: fb}}})
	uri := nbdURI(ts, "vol")

	out := run(t, "qemu-img", "info", "--output=json", uri)
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil || info.VirtualSize != interopSize {
		t.Fatalf("qemu-img info: %v %s", err, out)
	}

	// A sparse source: data at 0 and 32M, holes between.
	src := filepath.Join(t.TempDir(), "src.raw")
	f, _ := os.Create(src)
	f.Truncate(interopSize)
	f.WriteAt(pattern(1<<20, 1), 0)
	f.WriteAt(pattern(3<<20, 2), 32<<20)
	f.Close()
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, uri)
	if out := run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri); !strings.Contains(out, "identical") {
		t.Fatalf("qemu-img compare: %s", out)
	}
	run(t, "cmp", src, path)

	// Block status: the holes that convert left are holes in the replica
	// file and in QEMU's map of our export.
	out = run(t, "qemu-img", "map", "--output=json", "-f", "raw", uri)
	var extents []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal([]byte(out), &extents); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, out)
	}
	var data int64
	for _, e := range extents {
		if e.Data {
			data += e.Length
		}
	}
	if data < 4<<20 || data > 8<<20 {
		t.Fatalf("qemu-img map finds %d bytes of data, want about 4 MiB:\n%s", data, out)
	}
}

func TestInteropNbdinfoAndNbdcopy(t *testing.T) {
	testutil.RequireTools(t, "nbdinfo", "nbdcopy")
	checkNoGoroutines(t)
	fb, path := replicaExport(t)
	ts := startServer(t, "tcp", ServerConfig{Exports: []Export{
		{Name: "vol", Backend: fb, Description: "replica of vol"},
		{Name: "fenced", Backend: newMem(1<<20, 512), Epochs: &MemEpochs{}, AllowPlainRead: true},
	}})
	uri := nbdURI(ts, "vol")

	var info struct {
		Structured bool `json:"structured"`
		Exports    []struct {
			Size      int64    `json:"export-size"`
			ReadOnly  bool     `json:"is_read_only"`
			MultiConn bool     `json:"can_multi_conn"`
			Zero      bool     `json:"can_zero"`
			FUA       bool     `json:"can_fua"`
			MinBlock  int64    `json:"block_size_minimum"`
			MaxBlock  int64    `json:"block_size_maximum"`
			Contexts  []string `json:"contexts"`
		} `json:"exports"`
	}
	out := run(t, "nbdinfo", "--json", uri)
	if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	e := info.Exports[0]
	if !info.Structured || e.Size != interopSize || e.ReadOnly || !e.MultiConn || !e.Zero || !e.FUA ||
		e.MinBlock != 512 || e.MaxBlock != MaxPayload || len(e.Contexts) != 1 || e.Contexts[0] != MetaBaseAllocation {
		t.Fatalf("nbdinfo sees %+v", info)
	}
	out = run(t, "nbdinfo", "--list", "nbd://"+ts.Addr)
	if !strings.Contains(out, `export="vol"`) || !strings.Contains(out, "replica of vol") || !strings.Contains(out, `export="fenced"`) {
		t.Fatalf("nbdinfo --list:\n%s", out)
	}
	// A plain client of a fenced export reads, read-only.
	out = run(t, "nbdinfo", "--json", nbdURI(ts, "fenced"))
	if !strings.Contains(out, `"is_read_only": true`) {
		t.Fatalf("plain nbdinfo of a fenced export:\n%s", out)
	}

	// nbdcopy: several connections (we advertise multi-conn), many
	// requests in flight each.
	src := filepath.Join(t.TempDir(), "src.raw")
	os.WriteFile(src, pattern(interopSize, 5), 0o600)
	run(t, "nbdcopy", "--connections=4", "--requests=64", src, uri)
	run(t, "cmp", src, path)
	back := filepath.Join(t.TempDir(), "back.raw")
	run(t, "nbdcopy", "--connections=4", "--requests=64", uri, back)
	run(t, "cmp", src, back)

	// Zero the second half through nbdcopy's zero source; nbdinfo --map
	// then shows it as a hole.
	run(t, "nbdcopy", "--", "[", "nbdkit", "--exit-with-parent", "null", strconv.Itoa(interopSize), "]", uri)
	out = run(t, "nbdinfo", "--map", uri)
	if !strings.Contains(out, "hole,zero") {
		t.Fatalf("nbdinfo --map after zeroing:\n%s", out)
	}
	if got := fileBytes(t, path, 0, 1<<20); !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Fatal("zeroed export does not read zero in the replica file")
	}
}

func TestInteropTLSWithGnuTLSPeers(t *testing.T) {
	testutil.RequireTools(t, "qemu-io", "nbdinfo", "qemu-nbd")
	checkNoGoroutines(t)
	dir := devCA(t)
	m := newMem(interopSize, 512)
	ts := tlsServer(t, dir, m)

	// qemu-io (QEMU's GnuTLS client) writes through our TLS server.
	qemuIO(t, []string{"--object", "tls-creds-x509,id=tls0,endpoint=client,dir=" + dir,
		"--image-opts", fmt.Sprintf("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=%s,export=mem,tls-creds=tls0", port(ts.Addr))},
		"write -P 0x42 0 1M", "read -P 0x42 0 1M", "flush")
	if !bytes.Equal(m.snapshot()[:1<<20], bytes.Repeat([]byte{0x42}, 1<<20)) {
		t.Fatal("qemu-io's write over TLS did not land")
	}
	// libnbd's nbdinfo, with the same certificate folder.
	out := run(t, "nbdinfo", "nbds://"+ts.Addr+"/mem?tls-certificates="+dir)
	if !strings.Contains(out, "with TLS") {
		t.Fatalf("nbdinfo over TLS:\n%s", out)
	}
	// Without TLS they are turned away.
	if out, err := exec.Command("nbdinfo", nbdURI(ts, "mem")).CombinedOutput(); err == nil {
		t.Fatalf("nbdinfo without TLS got in:\n%s", out)
	}

	// Our client with mutual TLS against qemu-nbd, which verifies our
	// client certificate.
	img := filepath.Join(t.TempDir(), "q.raw")
	os.WriteFile(img, make([]byte, 8<<20), 0o600)
	sock := filepath.Join(t.TempDir(), "q.sock")
	startPeer(t, sock, "qemu-nbd", "-f", "raw", "-t", "-x", "q", "--shared=8", "-k", sock,
		"--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir="+dir, "--tls-creds", "tls0", img)
	ccfg, err := ClientTLSDir(dir, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	c, err := Dial(context.Background(), Config{Network: "unix", Addr: sock, Export: "q", TLS: ccfg, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	modelWorkout(t, c, 8, 100)
	// A client certificate of another CA is refused by qemu-nbd.
	other := devCA(t)
	foreign, _ := ClientTLSConfig(filepath.Join(dir, CAFile), filepath.Join(other, ClientCertFile), filepath.Join(other, ClientKeyFile), "localhost")
	if c2, err := Dial(context.Background(), Config{Network: "unix", Addr: sock, Export: "q", TLS: foreign, Logger: testLogger(t)}); err == nil {
		c2.Close()
		t.Fatal("qemu-nbd accepted a client certificate of another CA")
	}
}

func port(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

func TestInteropFencingWithQemuIO(t *testing.T) {
	testutil.RequireTools(t, "qemu-io", "nbdinfo")
	checkNoGoroutines(t)
	m := newMem(interopSize, 512)
	ts := startServer(t, "tcp", ServerConfig{Exports: []Export{{Name: "vol", Backend: m, Epochs: &MemEpochs{}, AllowPlainRead: true}}})
	ctx := context.Background()
	ours := dial(t, ts, Config{Export: "vol", Epoch: 3, MinBackoff: 5 * time.Millisecond})
	if err := ours.WriteAt(ctx, pattern(4096, 1), 0); err != nil {
		t.Fatal(err)
	}
	// QEMU as a fenced holder: the epoch rides in the export name.
	qemuIO(t, []string{"-f", "raw", nbdURI(ts, "vol@epoch=4")}, "write -P 0x44 0 64k", "flush")
	if e, _ := ts.Epoch("vol"); e != 4 {
		t.Fatalf("epoch %d after qemu-io's write", e)
	}
	if err := ours.WriteAt(ctx, pattern(4096, 1), 0); err == nil {
		t.Fatal("the fenced holder still writes")
	}
	waitState(t, ours, Fenced)
	// qemu-io with the old epoch is refused; plain qemu-io reads and
	// cannot write.
	if out, err := exec.Command("qemu-io", "-f", "raw", nbdURI(ts, "vol@epoch=3"), "-c", "read 0 512").CombinedOutput(); err == nil || !strings.Contains(string(out), "fenced") {
		t.Fatalf("qemu-io with an old epoch: %v\n%s", err, out)
	}
	qemuIO(t, []string{"-r", "-f", "raw", nbdURI(ts, "vol")}, "read -P 0x44 0 64k")
	if out, err := exec.Command("qemu-io", "-f", "raw", nbdURI(ts, "vol"), "-c", "write 0 512").CombinedOutput(); err == nil && !strings.Contains(string(out), "read-only") && !strings.Contains(string(out), "not permitted") {
		t.Fatalf("plain qemu-io wrote to a fenced export:\n%s", out)
	}
}

// startPeer starts an NBD server process listening on the Unix socket
// sock, waits until it accepts, and kills it when the test ends.
func startPeer(t *testing.T, sock string, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("%s output:\n%s", name, out.String())
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return cmd
		}
		select {
		case <-exited:
			t.Fatalf("%s exited: %s", name, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not listen on %s: %s", name, sock, out.String())
		}
	}
}

// modelWorkout runs concurrent random writes, discards, write-zeroes and
// reads through c over the first len of the export, each goroutine in
// its own slice, checking reads against a model; it returns the model.
func modelWorkout(t *testing.T, c *Client, workers, ops int) []byte {
	t.Helper()
	size := c.Size()
	block := max(c.BlockSize(), 512)
	model := make([]byte, size)
	ctx := context.Background()
	if err := c.ReadAt(ctx, model, 0); err != nil {
		t.Fatal(err)
	}
	wl := &workload{c: c, model: model, block: block, maxBlocks: 32,
		kinds: []opKind{opWrite, opWrite, opDiscard, opZeroes, opRead}}
	span := size / int64(workers) / block * block
	for _, err := range wl.run(ctx, 7, 0, workers-1, span, func(i int) bool { return i < ops }) {
		t.Fatal(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if err := c.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("export differs from the model: %v", err)
	}
	return model
}

func TestInteropClientAgainstQemuNbd(t *testing.T) {
	testutil.RequireTools(t, "qemu-nbd")
	checkNoGoroutines(t)
	img := filepath.Join(t.TempDir(), "q.raw")
	f, _ := os.Create(img)
	f.Truncate(16 << 20)
	f.WriteAt(pattern(1<<20, 3), 4<<20)
	f.Close()
	sock := filepath.Join(t.TempDir(), "q.sock")
	args := []string{"-f", "raw", "-t", "-x", "q", "--shared=8", "--cache=none", "--discard=unmap", "-k", sock, img}
	startPeer(t, sock, "qemu-nbd", args...)
	c, err := Dial(context.Background(), Config{Network: "unix", Addr: sock, Export: "q", Logger: testLogger(t),
		MinBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	i := c.Info()
	t.Logf("qemu-nbd negotiated: %+v", i)
	if !i.Structured || !i.BlockStatus || i.Flags&FlagSendWriteZeroes == 0 {
		t.Fatalf("qemu-nbd negotiated %+v", i)
	}
	ctx := context.Background()
	// Reading a sparse image exercises qemu-nbd's hole chunks.
	got := make([]byte, 16<<20)
	if err := c.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 16<<20)
	copy(want[4<<20:], pattern(1<<20, 3))
	if !bytes.Equal(got, want) {
		t.Fatal("read of a sparse image through qemu-nbd differs")
	}
	ext, err := c.BlockStatus(ctx, 0, 16<<20)
	if err != nil || len(ext) < 2 || ext[0].Flags&StateHole == 0 {
		t.Fatalf("block status from qemu-nbd: %+v %v", ext, err)
	}
	model := modelWorkout(t, c, 8, 150)
	if !bytes.Equal(fileBytes(t, img, 0, 16<<20), model) {
		t.Fatal("image file differs from what the client wrote")
	}

	// qemu-nbd killed: a request waits, its context's deadline permitting;
	// restarted meanwhile: the request is sent to the new qemu-nbd.
	killPeerOn(t, sock)
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := c.ReadAt(short, got[:4096], 0); !errors.Is(err, ErrDisconnected) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read with qemu-nbd dead past its deadline: %v", err)
	}
	read := make(chan error, 1)
	go func() { read <- c.ReadAt(ctx, got[:4096], 0) }()
	time.Sleep(300 * time.Millisecond)
	startPeer(t, sock, "qemu-nbd", args...)
	if err := <-read; err != nil || !bytes.Equal(got[:4096], model[:4096]) {
		t.Fatalf("read across the restart of qemu-nbd: %v", err)
	}
}

// killPeerOn kills, with SIGKILL, the process serving sock, found by the
// socket path on its command line, and waits for the client side to see
// the connection go. It returns the killed process id.
func killPeerOn(t *testing.T, sock string) int {
	t.Helper()
	out, err := exec.Command("pgrep", "-f", "-o", sock).Output()
	if err != nil {
		t.Fatalf("no process serves %s", sock)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(out)))
	syscall.Kill(pid, syscall.SIGKILL)
	os.Remove(sock)
	time.Sleep(200 * time.Millisecond)
	return pid
}

func nbdkit(t *testing.T, sock string, args ...string) {
	t.Helper()
	startPeer(t, sock, "nbdkit", append([]string{"-f", "--exit-with-parent", "-U", sock}, args...)...)
}

func TestInteropClientAgainstNbdkitMemory(t *testing.T) {
	testutil.RequireTools(t, "nbdkit")
	checkNoGoroutines(t)
	sock := filepath.Join(t.TempDir(), "k.sock")
	nbdkit(t, sock, "memory", "32M")
	c, err := Dial(context.Background(), Config{Network: "unix", Addr: sock, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t.Logf("nbdkit negotiated: %+v", c.Info())
	modelWorkout(t, c, 8, 200)
}

func TestInteropNbdkitErrorFilter(t *testing.T) {
	testutil.RequireTools(t, "nbdkit")
	checkNoGoroutines(t)
	dir := t.TempDir()
	sock, inject := filepath.Join(dir, "k.sock"), filepath.Join(dir, "inject")
	nbdkit(t, sock, "--filter=error", "memory", "8M", "error=ENOSPC",
		"error-pwrite-rate=100%", "error-pwrite-file="+inject,
		"error-zero-rate=100%", "error-zero-file="+inject)
	c, err := Dial(context.Background(), Config{Network: "unix", Addr: sock, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if err := c.WriteAt(ctx, pattern(4096, 1), 0); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(inject, nil, 0o600)
	for i := 0; i < 10; i++ {
		if err := c.WriteAt(ctx, pattern(4096, 2), 4096); !errors.Is(err, ENOSPC) || !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("write with errors injected: %v, want ENOSPC", err)
		}
		if err := c.WriteZeroes(ctx, 0, 4096); !errors.Is(err, ENOSPC) {
			t.Fatalf("write zeroes with errors injected: %v, want ENOSPC", err)
		}
		got := make([]byte, 4096)
		if err := c.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, pattern(4096, 1)) {
			t.Fatalf("read while writes fail: %v", err)
		}
	}
	if s, err := c.State(); s != Connected {
		t.Fatalf("per-request errors cost the connection: %v %v", s, err)
	}
	os.Remove(inject)
	if err := c.WriteAt(ctx, pattern(4096, 2), 4096); err != nil {
		t.Fatalf("write after errors stopped: %v", err)
	}
}

func TestInteropNbdkitDelayFilter(t *testing.T) {
	testutil.RequireTools(t, "nbdkit")
	checkNoGoroutines(t)
	sock := filepath.Join(t.TempDir(), "k.sock")
	nbdkit(t, sock, "--filter=delay", "memory", "8M", "delay-read=1500ms")
	c, err := Dial(context.Background(), Config{Network: "unix", Addr: sock, Logger: testLogger(t), Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	// Reads are slower than the timeout: each fails alone.
	start := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.ReadAt(ctx, make([]byte, 4096), int64(i)*4096); !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("slow read: %v, want a timeout", err)
			}
		}()
	}
	wg.Wait()
	if d := time.Since(start); d > time.Second {
		t.Fatalf("timeouts took %v", d)
	}
	// Writes are not delayed and go through on the same connection while
	// the late read replies are still to come.
	for i := 0; i < 10; i++ {
		if err := c.WriteAt(ctx, pattern(4096, byte(i)), 1<<20); err != nil {
			t.Fatalf("write next to timed-out reads: %v", err)
		}
	}
	// A caller whose context allows more than the default gets its read,
	// after the late replies of the others arrived and were dropped.
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	got := make([]byte, 4096)
	if err := c.ReadAt(lctx, got, 1<<20); err != nil || !bytes.Equal(got, pattern(4096, 9)) {
		t.Fatalf("read with a long deadline: %v", err)
	}
	if s, err := c.State(); s != Connected {
		t.Fatalf("timeouts cost the connection: %v %v", s, err)
	}
}
