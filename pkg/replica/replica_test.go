package replica

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func paths(dir string, names ...string) []string {
	var out []string
	for _, n := range names {
		out = append(out, filepath.Join(dir, n))
	}
	return out
}

func TestCreate(t *testing.T) {
	dir := t.TempDir()
	ps := paths(dir, "a.img", "b.img")
	if err := Create(ps, 1<<20); err != nil {
		t.Fatal(err)
	}
	var vol string
	for _, p := range ps {
		st, err := os.Stat(p)
		if err != nil || st.Size() != 1<<20 {
			t.Fatalf("%s: %v size %d", p, err, st.Size())
		}
		if blocks := st.Sys().(*syscall.Stat_t).Blocks; blocks != 0 {
			t.Errorf("%s not sparse: %d blocks", p, blocks)
		}
		m, err := ReadMeta(p)
		if err != nil {
			t.Fatal(err)
		}
		if vol == "" {
			vol = m.VolumeID
		}
		if m.VolumeID != vol || m.Size != 1<<20 || m.State != StateClean || m.Generation != 0 {
			t.Errorf("meta %+v", m)
		}
	}
	if a, b := mustMeta(t, ps[0]), mustMeta(t, ps[1]); a.ReplicaID == b.ReplicaID {
		t.Error("replicas share a replica id")
	}
}

func mustMeta(t *testing.T, p string) Meta {
	t.Helper()
	m, err := ReadMeta(p)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestCreateRefuses(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "exists.img")
	if err := os.WriteFile(existing, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Symlink(filepath.Join(dir, "new.img"), filepath.Join(dir, "link.img"))
	tests := []struct {
		name  string
		paths []string
		size  int64
		want  string
	}{
		{"overwrite", paths(dir, "new.img", "exists.img"), 1 << 20, "already exists"},
		{"unaligned size", paths(dir, "new.img"), 1000, "multiple of 4096"},
		{"zero size", paths(dir, "new.img"), 0, "positive multiple"},
		{"twice", paths(dir, "new.img", "new.img"), 1 << 20, "given twice"},
		{"twice via dots", []string{filepath.Join(dir, "new.img"), dir + "/./new.img"}, 1 << 20, "given twice"},
		{"dangling symlink", paths(dir, "link.img"), 1 << 20, "already exists"},
		{"missing folder", paths(dir, "new.img", "nodir/x.img"), 1 << 20, "no such file"},
		{"none", nil, 1 << 20, "no replica paths"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := Create(tc.paths, tc.size)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			if b, _ := os.ReadFile(existing); string(b) != "precious" {
				t.Fatal("existing file changed")
			}
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				if e.Name() != "exists.img" && e.Name() != "link.img" {
					t.Errorf("a refused create left %s behind", e.Name())
				}
			}
		})
	}
}

func TestOpen(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.img")
	if err := Create([]string{p}, 1<<20); err != nil {
		t.Fatal(err)
	}
	r, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(p); !errors.Is(err, ErrInUse) {
		t.Errorf("second Open: err = %v, want ErrInUse", err)
	}
	if _, err := OpenReadOnly(p); !errors.Is(err, ErrInUse) {
		t.Errorf("OpenReadOnly of an open replica: err = %v, want ErrInUse", err)
	}
	r.Close()
	ro1, err := OpenReadOnly(p)
	if err != nil {
		t.Fatal(err)
	}
	ro2, err := OpenReadOnly(p)
	if err != nil {
		t.Fatalf("readers must share: %v", err)
	}
	ro1.Close()
	ro2.Close()

	plain := filepath.Join(dir, "plain.img")
	os.WriteFile(plain, make([]byte, 4096), 0o600)
	if _, err := Open(plain); err == nil || !strings.Contains(err.Error(), "not a quorum replica") {
		t.Errorf("plain file: err = %v", err)
	}
	if _, err := Open(filepath.Join(dir, "missing.img")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: err = %v", err)
	}
	os.Truncate(p, 2<<20)
	if _, err := Open(p); err == nil || !strings.Contains(err.Error(), "metadata says") {
		t.Errorf("resized image: err = %v", err)
	}
	os.WriteFile(MetaPath(p), []byte("{"), 0o600)
	if _, err := Open(p); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("torn metadata: err = %v", err)
	}
}

func openNew(t *testing.T, size int64) *File {
	t.Helper()
	p := filepath.Join(t.TempDir(), "r.img")
	if err := Create([]string{p}, size); err != nil {
		t.Fatal(err)
	}
	r, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func allocated(t *testing.T, r *File) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(r.Path(), &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestIO(t *testing.T) {
	r := openNew(t, 4<<20)
	ctx := context.Background()
	// An odd offset into a buffer makes the memory unaligned for direct
	// I/O: the replica must bounce it rather than fail.
	raw := make([]byte, 64<<10+1)
	data := raw[1:]
	for i := range data {
		data[i] = byte(i * 7)
	}
	if err := r.WriteAt(ctx, data, 1<<20); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data)+1)[1:]
	if err := r.ReadAt(ctx, got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v equal=%v", err, bytes.Equal(got, data))
	}
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// The image is the volume, byte for byte.
	f, _ := os.ReadFile(r.Path())
	if !bytes.Equal(f[1<<20:1<<20+len(data)], data) {
		t.Fatal("image does not hold the data at the volume offset")
	}
	if allocated(t, r) < int64(len(data)) {
		t.Fatal("write not allocated")
	}
	if err := r.Discard(ctx, 1<<20, int64(len(data))); err != nil {
		t.Fatal(err)
	}
	if a := allocated(t, r); a != 0 {
		t.Errorf("discard left %d bytes allocated; want a hole", a)
	}
	if err := r.ReadAt(ctx, got, 1<<20); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatal("discarded range does not read as zeroes")
	}
	r.WriteAt(ctx, data, 0)
	if err := r.WriteZeroes(ctx, 0, int64(len(data))); err != nil {
		t.Fatal(err)
	}
	if err := r.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatal("zeroed range does not read as zeroes")
	}
}

func TestIORefusesBadRanges(t *testing.T) {
	r := openNew(t, 1<<20)
	ctx := context.Background()
	if err := r.WriteAt(ctx, make([]byte, 512), 100); !errors.Is(err, ErrUnaligned) {
		t.Errorf("unaligned offset: %v", err)
	}
	if err := r.ReadAt(ctx, make([]byte, 100), 0); !errors.Is(err, ErrUnaligned) {
		t.Errorf("unaligned length: %v", err)
	}
	if err := r.ReadAt(ctx, make([]byte, 4096), 1<<20); err == nil {
		t.Error("read beyond the end succeeded")
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := r.WriteAt(cctx, make([]byte, 512), 0); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
}

func TestUpdateMetaAtomic(t *testing.T) {
	r := openNew(t, 1<<20)
	if err := r.UpdateMeta(func(m *Meta) { m.Generation = 7 }); err != nil {
		t.Fatal(err)
	}
	m := mustMeta(t, r.Path())
	if m.Generation != 7 {
		t.Fatalf("meta %+v", m)
	}
	ents, _ := os.ReadDir(filepath.Dir(r.Path()))
	if len(ents) != 2 {
		t.Errorf("temporary files left: %v", ents)
	}
	// A failed write leaves the old metadata in memory: here the rename
	// fails because a non-empty folder stands where the file goes.
	os.Remove(MetaPath(r.Path()))
	os.Mkdir(MetaPath(r.Path()), 0o700)
	os.WriteFile(filepath.Join(MetaPath(r.Path()), "x"), nil, 0o600)
	if err := r.UpdateMeta(func(m *Meta) { m.Generation = 8 }); err == nil {
		t.Fatal("update succeeded where the metadata file cannot be replaced")
	}
	if r.Meta().Generation != 7 {
		t.Error("in-memory metadata changed on failure")
	}
}

// TestJournalTornRecord: records alternate between two slots, so a torn
// newest record leaves the previous one readable.
func TestJournalTornRecord(t *testing.T) {
	r := openNew(t, 1<<20)
	const slot = 8192
	if _, ok, err := r.ReadJournal(slot); ok || err != nil {
		t.Fatalf("new replica has a record: %v %v", ok, err)
	}
	for seq := uint64(1); seq <= 3; seq++ {
		if err := r.WriteJournal(JournalEntry{Seq: seq, Payload: bytes.Repeat([]byte{byte(seq)}, 100)}, slot); err != nil {
			t.Fatal(err)
		}
	}
	e, ok, err := r.ReadJournal(slot)
	if err != nil || !ok || e.Seq != 3 || e.Payload[0] != 3 {
		t.Fatalf("newest: %+v %v %v", e, ok, err)
	}
	// Tear record 3 (slot 1): one payload byte changes.
	f, _ := os.OpenFile(JournalPath(r.Path()), os.O_WRONLY, 0)
	f.WriteAt([]byte{9}, slot+journalHeader+50)
	f.Close()
	e, ok, err = r.ReadJournal(slot)
	if err != nil || !ok || e.Seq != 2 || e.Payload[0] != 2 {
		t.Fatalf("after a torn record: %+v %v %v, want record 2", e, ok, err)
	}
	if err := r.WriteJournal(JournalEntry{Seq: 4, Payload: make([]byte, slot)}, slot); err == nil {
		t.Fatal("a record larger than its slot was written")
	}
}
