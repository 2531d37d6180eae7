package replica

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// testSlot is a slot size that grows with the volume, as the attach's
// does, so that growing moves records.
func testSlot(size int64) int64 { return 4096 * (1 + size/(1<<20)) }

func TestCreateWithID(t *testing.T) {
	p := filepath.Join(t.TempDir(), "r1.img")
	if err := CreateWithID(p, 1<<20, "uid-1", "r1"); err != nil {
		t.Fatal(err)
	}
	m, err := ReadMeta(p)
	if err != nil {
		t.Fatal(err)
	}
	if m.VolumeID != "uid-1" || m.ReplicaID != "r1" || m.Size != 1<<20 || m.State != StateClean {
		t.Fatalf("meta %+v", m)
	}
	if err := CreateWithID(p, 1<<20, "uid-1", "r1"); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Fatalf("second create: %v, want a refusal", err)
	}
	if err := CreateWithID(filepath.Join(t.TempDir(), "x.img"), 1<<20, "", "r1"); err == nil {
		t.Fatal("empty volume id accepted")
	}
}

func TestGrow(t *testing.T) {
	tests := []struct {
		name    string
		size    int64
		inUse   bool
		wantErr string
		want    int64
	}{
		{name: "grow", size: 4 << 20, want: 4 << 20},
		{name: "same size", size: 1 << 20, want: 1 << 20},
		{name: "shrink", size: 512 << 10, wantErr: "never shrink", want: 1 << 20},
		{name: "unaligned", size: 4<<20 + 1, wantErr: "multiple of 4096", want: 1 << 20},
		{name: "in use", size: 4 << 20, inUse: true, wantErr: "in use", want: 1 << 20},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "a.img")
			if err := Create([]string{p}, 1<<20); err != nil {
				t.Fatal(err)
			}
			if tc.inUse {
				r, err := Open(p)
				if err != nil {
					t.Fatal(err)
				}
				defer r.Close()
			}
			err := Grow(p, tc.size, testSlot)
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("Grow: %v, want error containing %q", err, tc.wantErr)
			}
			if tc.inUse && !errors.Is(err, ErrInUse) {
				t.Fatalf("Grow of an open replica: %v, want ErrInUse", err)
			}
			m, err := ReadMeta(p)
			if err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if m.Size != tc.want || st.Size() != tc.want {
				t.Fatalf("after Grow: metadata %d, image %d bytes, want %d", m.Size, st.Size(), tc.want)
			}
		})
	}
}

// TestGrowMovesJournal checks that the newest record survives a change
// of slot size from either slot, and reads the same with the old slot
// size (what a crash before the metadata is replaced leaves) and the new.
func TestGrowMovesJournal(t *testing.T) {
	for _, seq := range []uint64{6, 7} {
		p := filepath.Join(t.TempDir(), "a.img")
		if err := Create([]string{p}, 1<<20); err != nil {
			t.Fatal(err)
		}
		r, err := Open(p)
		if err != nil {
			t.Fatal(err)
		}
		old := testSlot(1 << 20)
		for s := seq - 1; s <= seq; s++ {
			if err := r.WriteJournal(JournalEntry{Seq: s, Payload: bytes.Repeat([]byte{byte(s)}, 3000)}, old); err != nil {
				t.Fatal(err)
			}
		}
		r.Close()
		if err := Grow(p, 8<<20, testSlot); err != nil {
			t.Fatal(err)
		}
		j, err := os.Open(JournalPath(p))
		if err != nil {
			t.Fatal(err)
		}
		for _, slot := range []int64{old, testSlot(8 << 20)} {
			e, ok, err := ReadJournalFrom(j, slot)
			if err != nil || !ok || e.Seq != seq || !bytes.Equal(e.Payload, bytes.Repeat([]byte{byte(seq)}, 3000)) {
				t.Errorf("seq %d, slot size %d: newest record %d (ok %v, %v), want %d", seq, slot, e.Seq, ok, err, seq)
			}
		}
		j.Close()
	}
}
