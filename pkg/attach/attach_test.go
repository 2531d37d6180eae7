package attach

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/alignbuf"
	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

// memVolume is an in-memory volume that counts what the frontend asked.
type memVolume struct {
	mu      sync.Mutex
	data    []byte
	flushes int
	discard [][2]int64
	zeroes  [][2]int64
	failAt  int64 // reads covering this offset fail; -1 never
}

func (m *memVolume) ReadAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failAt >= off && m.failAt < off+int64(len(p)) {
		return errors.New("injected")
	}
	copy(p, m.data[off:])
	return nil
}

func (m *memVolume) WriteAt(_ context.Context, p []byte, off int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	copy(m.data[off:], p)
	return nil
}

func (m *memVolume) Flush(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushes++
	return nil
}

func (m *memVolume) Discard(_ context.Context, off, length int64) error {
	m.zero(&m.discard, off, length)
	return nil
}

func (m *memVolume) WriteZeroes(_ context.Context, off, length int64) error {
	m.zero(&m.zeroes, off, length)
	return nil
}

// zero clears the range and records it in asked.
func (m *memVolume) zero(asked *[][2]int64, off, length int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	*asked = append(*asked, [2]int64{off, length})
	clear(m.data[off : off+length])
}

func (m *memVolume) Size() int64 { return int64(len(m.data)) }

// TestFUSELoop checks the mapping of block requests onto the volume:
// reads, writes, flush, discard and write-zeroes, errors as EIO, the
// device's size, direct I/O, and a clean detach.
func TestFUSELoop(t *testing.T) {
	testutil.RequireKernel(t)
	testutil.RequireTools(t, "blkdiscard", "losetup")
	dir := testutil.KernelDir(t)
	vol := &memVolume{data: make([]byte, 32<<20), failAt: -1}
	dev, err := AttachFUSELoop(context.Background(), vol, FUSELoopOptions{StateDir: filepath.Join(dir, "state")})
	if err != nil {
		t.Fatal(err)
	}
	detached := false
	defer func() {
		if !detached {
			dev.ForceDetach()
		}
	}()
	backing := testutil.TrackLoop(t, dev.Path())
	name := filepath.Base(dev.Path())
	if b, _ := os.ReadFile("/sys/block/" + name + "/size"); strings.TrimSpace(string(b)) != strconv.Itoa(32<<20/512) {
		t.Errorf("device size %s sectors, want %d", b, 32<<20/512)
	}
	if b, _ := os.ReadFile("/sys/block/" + name + "/loop/dio"); strings.TrimSpace(string(b)) != "1" {
		t.Errorf("direct I/O off")
	}

	f, err := os.OpenFile(dev.Path(), os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignbuf.Make(1<<20, 0)
	for i := range buf {
		buf[i] = byte(i % 251)
	}
	if _, err := f.WriteAt(buf, 4<<20); err != nil {
		t.Fatal(err)
	}
	vol.mu.Lock()
	reached := bytes.Equal(vol.data[4<<20:5<<20], buf)
	vol.mu.Unlock()
	if !reached {
		t.Fatal("write did not reach the volume at its offset")
	}
	got := alignbuf.Make(1<<20, 0)
	if _, err := f.ReadAt(got, 4<<20); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read back: %v", err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	vol.mu.Lock()
	flushes := vol.flushes
	vol.failAt = 8 << 20
	vol.mu.Unlock()
	if flushes == 0 {
		t.Error("fsync of the device did not flush the volume")
	}
	if _, err := f.ReadAt(got[:4096], 8<<20); !errors.Is(err, syscall.EIO) {
		t.Errorf("failing read: err = %v, want EIO", err)
	}
	f.Close()

	testutil.Run(t, "blkdiscard", "--offset", "4194304", "--length", "524288", dev.Path())
	testutil.Run(t, "blkdiscard", "--zeroout", "--offset", "4718592", "--length", "524288", dev.Path())
	vol.mu.Lock()
	if len(vol.discard) == 0 || len(vol.zeroes) == 0 {
		t.Errorf("discards %v, write-zeroes %v: want both", vol.discard, vol.zeroes)
	}
	if !bytes.Equal(vol.data[4<<20:5<<20], make([]byte, 1<<20)) {
		t.Error("discarded and zeroed range not zero")
	}
	vol.mu.Unlock()

	// Held open, the device is not detached; Detach reports busy and
	// keeps serving.
	holder, err := os.Open(dev.Path())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := dev.Detach(ctx); !errors.Is(err, ErrBusy) {
		t.Fatalf("detach while open: err = %v, want ErrBusy", err)
	}
	if _, err := holder.ReadAt(make([]byte, 512), 4<<20); err != nil {
		t.Fatalf("read after a refused detach: %v", err)
	}
	holder.Close()
	if err := dev.Detach(context.Background()); err != nil {
		t.Fatal(err)
	}
	detached = true
	if id, bound := testutil.LoopBacking(dev.Path()); bound && id == backing {
		t.Errorf("%s still bound after detach", dev.Path())
	}
}
