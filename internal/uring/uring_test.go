package uring

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

func TestReadWriteFsync(t *testing.T) {
	r, err := Default()
	if err != nil {
		testutil.Unavailable(t, fmt.Sprintf("io_uring unavailable here: %v (replicas fall back to plain system calls)", err))
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	const block, blocks = 4096, 512
	// More goroutines than ring entries: submissions beyond the limit wait
	// for free slots.
	var wg sync.WaitGroup
	for g := range 2 * Entries {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(g)))
			for range 8 {
				b := rng.Intn(blocks)
				p := bytes.Repeat([]byte{byte(b)}, block)
				if n, err := r.Pwrite(fd, p, int64(b*block)); err != nil || n != block {
					t.Errorf("write block %d: %d, %v", b, n, err)
					return
				}
				got := make([]byte, block)
				if n, err := r.Pread(fd, got, int64(b*block)); err != nil || n != block || !bytes.Equal(got, p) {
					t.Errorf("read block %d: %d, %v", b, n, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := r.Fdatasync(fd); err != nil {
		t.Fatal(err)
	}
	// Reads stop short at the end of the file.
	st, _ := f.Stat()
	p := make([]byte, 8192)
	n, err := r.Pread(fd, p, st.Size()-100)
	if err != nil || n != 100 {
		t.Fatalf("read across the end: %d, %v; want 100", n, err)
	}
	// Errors come back as errnos.
	if _, err := r.Pread(-1, p, 0); err != syscall.EBADF {
		t.Fatalf("bad fd: %v, want EBADF", err)
	}
}
