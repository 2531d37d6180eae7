package volume

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

func newReplicas(t *testing.T, dir string, size int64, names ...string) []string {
	t.Helper()
	var ps []string
	for _, n := range names {
		ps = append(ps, filepath.Join(dir, n))
	}
	if err := replica.Create(ps, size); err != nil {
		t.Fatal(err)
	}
	return ps
}

func meta(t *testing.T, p string) replica.Meta {
	t.Helper()
	m, err := replica.ReadMeta(p)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestOpenCloseLifecycle(t *testing.T) {
	ps := newReplicas(t, t.TempDir(), 1<<20, "a", "b", "c")
	v, err := Open(ps, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(v.Unclean) != 0 {
		t.Errorf("fresh replicas reported unclean: %v", v.Unclean)
	}
	for _, p := range ps {
		if m := meta(t, p); m.Generation != 1 || m.State != replica.StateOpen {
			t.Errorf("%s while open: %+v", p, m)
		}
	}
	if _, err := Open(ps, Options{}); !errors.Is(err, replica.ErrInUse) {
		t.Fatalf("second attach: err = %v, want in use", err)
	}
	ctx := context.Background()
	if err := v.WriteAt(ctx, bytes.Repeat([]byte{9}, 4096), 8192); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		if m := meta(t, p); m.Generation != 1 || m.State != replica.StateClean {
			t.Errorf("%s after close: %+v", p, m)
		}
		if b, _ := os.ReadFile(p); b[8192] != 9 {
			t.Errorf("%s lacks the write", p)
		}
	}
	// Not closing counts as a crash: the next attach says so.
	v, err = Open(ps, Options{})
	if err != nil {
		t.Fatal(err)
	}
	v.closeFiles()
	v, err = Open(ps, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close(ctx)
	if !slices.Equal(v.Unclean, ps) {
		t.Errorf("unclean = %v, want all", v.Unclean)
	}
}

// snapshot reads every file in dir, to prove a refused attach wrote nothing.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		out[e.Name()] = string(b)
	}
	return out
}

func TestOpenRefuses(t *testing.T) {
	dir := t.TempDir()
	abc := newReplicas(t, dir, 1<<20, "a", "b", "c")
	other := newReplicas(t, dir, 1<<20, "other")
	big := newReplicas(t, dir, 2<<20, "big", "held")
	// big claims to be a's volume, but is twice its size.
	abcVol := meta(t, abc[0]).VolumeID
	if err := rewriteMeta(big[0], func(m *replica.Meta) { m.VolumeID = abcVol }); err != nil {
		t.Fatal(err)
	}
	// A copy of a replica, image and metadata, claims the same identity.
	for _, suffix := range []string{"", replica.MetaSuffix} {
		b, _ := os.ReadFile(abc[0] + suffix)
		os.WriteFile(filepath.Join(dir, "copy"+suffix), b, 0o600)
	}
	copyOfA := filepath.Join(dir, "copy")
	// d and e: one attach left out e (generation), another recorded f as
	// stale.
	de := newReplicas(t, dir, 1<<20, "d", "e", "f")
	v, err := Open(de[:2], Options{})
	if err != nil {
		t.Fatal(err)
	}
	v.Close(context.Background())
	if err := rewriteMeta(de[0], func(m *replica.Meta) { m.Stale = []string{meta(t, de[2]).ReplicaID} }); err != nil {
		t.Fatal(err)
	}
	if err := rewriteMeta(de[2], func(m *replica.Meta) { m.Generation = 1 }); err != nil {
		t.Fatal(err)
	}
	held, err := replica.Open(big[1])
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()

	tests := []struct {
		name  string
		paths []string
		opts  Options
		want  string
	}{
		{"other volume", []string{abc[0], other[0]}, Options{}, "belongs to volume"},
		{"sizes differ", []string{abc[0], abc[1], big[0]}, Options{}, "replicas differ in size"},
		{"same replica twice", []string{abc[0], copyOfA}, Options{}, "same replica"},
		{"path twice", []string{abc[0], abc[0]}, Options{}, "given twice"},
		{"missing", []string{abc[0], filepath.Join(dir, "nope")}, Options{}, "no such file"},
		{"threshold above N", abc, Options{VoteThreshold: 4}, "vote threshold 4 out of range"},
		{"in use", []string{big[1]}, Options{}, "in use"},
		{"fifo with rewrite", abc, Options{ReadPattern: quorum.ReadPatternFIFO, RewriteCorrupted: true}, "rewrite-corrupted needs"},
		{"left out of the last attach", []string{de[0], de[1], filepath.Join(dir, "e2")}, Options{}, ""},
		{"recorded stale", de, Options{}, "recorded that it failed"},
	}
	// e2: a replica of d's volume that stayed at generation 0.
	if err := rewriteMetaCopy(t, de[1], filepath.Join(dir, "e2")); err != nil {
		t.Fatal(err)
	}
	tests[8].want = "is stale: it is at generation 0 while others are at 1"
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshot(t, dir)
			_, err := Open(tc.paths, tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			after := snapshot(t, dir)
			for name, b := range before {
				if after[name] != b {
					t.Errorf("refused attach changed %s", name)
				}
			}
			if len(after) != len(before) {
				t.Errorf("refused attach made files")
			}
		})
	}
}

func rewriteMeta(p string, fn func(*replica.Meta)) error {
	r, err := replica.Open(p)
	if err != nil {
		return err
	}
	defer r.Close()
	return r.UpdateMeta(fn)
}

// rewriteMetaCopy makes dst a fresh replica with src's volume identity at
// generation 0.
func rewriteMetaCopy(t *testing.T, src, dst string) error {
	t.Helper()
	newReplicas(t, filepath.Dir(dst), meta(t, src).Size, filepath.Base(dst))
	vol := meta(t, src).VolumeID
	return rewriteMeta(dst, func(m *replica.Meta) { m.VolumeID = vol; m.Generation = 0 })
}

// failingChild fails writes once armed.
type failingChild struct {
	quorum.Child
	armed bool
}

func (f *failingChild) WriteAt(ctx context.Context, p []byte, off int64) error {
	if f.armed {
		return errors.New("injected write failure")
	}
	return f.Child.WriteAt(ctx, p, off)
}

// TestFaultyReplicaRecordedStale: a replica that fails a write is named
// stale in the others' metadata before the write is acknowledged, so the
// next attach refuses it, and it is left open (not clean) itself.
func TestFaultyReplicaRecordedStale(t *testing.T) {
	ps := newReplicas(t, t.TempDir(), 1<<20, "a", "b", "c")
	var bad *failingChild
	opts := Options{wrapChild: func(i int, c quorum.Child) quorum.Child {
		if i == 2 {
			bad = &failingChild{Child: c}
			return bad
		}
		return c
	}}
	v, err := Open(ps, opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	bad.armed = true
	if err := v.WriteAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatalf("write with 2 of 3: %v", err)
	}
	cID := meta(t, ps[2]).ReplicaID
	for _, p := range ps[:2] {
		if !meta(t, p).IsStale(cID) {
			t.Errorf("%s does not record c as stale", p)
		}
	}
	if err := v.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if m := meta(t, ps[2]); m.State != replica.StateOpen {
		t.Errorf("faulty replica marked %s", m.State)
	}
	if _, err := Open(ps, Options{}); err == nil || !strings.Contains(err.Error(), "recorded that it failed") {
		t.Fatalf("reattach with the stale replica: err = %v", err)
	}
	v, err = Open(ps[:2], Options{})
	if err != nil {
		t.Fatalf("reattach without it: %v", err)
	}
	v.Close(ctx)
}

func TestCompare(t *testing.T) {
	ps := newReplicas(t, t.TempDir(), 4<<20, "a", "b", "c")
	write := func(p string, off int64, n int, b byte) {
		f, _ := os.OpenFile(p, os.O_WRONLY, 0)
		f.WriteAt(bytes.Repeat([]byte{b}, n), off)
		f.Close()
	}
	write(ps[2], 4096, 8192, 1)         // c differs in two adjacent blocks
	write(ps[1], 3<<20+100, 10, 2)      // b differs in one block
	write(ps[2], 3<<20+100, 10, 3)      // and c differently there
	write(ps[0], (1<<20)-4096, 8192, 4) // a differs across a chunk boundary
	var diffs []Diff
	if err := Compare(context.Background(), ps, func(d Diff) { diffs = append(diffs, d) }); err != nil {
		t.Fatal(err)
	}
	want := []Diff{
		{Offset: 4096, Length: 8192, Groups: [][]string{{ps[0], ps[1]}, {ps[2]}}},
		{Offset: 1<<20 - 4096, Length: 8192, Groups: [][]string{{ps[0]}, {ps[1], ps[2]}}},
		{Offset: 3 << 20, Length: 4096, Groups: [][]string{{ps[0]}, {ps[1]}, {ps[2]}}},
	}
	if len(diffs) != len(want) {
		t.Fatalf("diffs = %+v, want %+v", diffs, want)
	}
	for i := range want {
		if diffs[i].Offset != want[i].Offset || diffs[i].Length != want[i].Length || !sameGroups(diffs[i].Groups, want[i].Groups) {
			t.Errorf("diff %d = %+v, want %+v", i, diffs[i], want[i])
		}
	}
	diffs = nil
	if err := Compare(context.Background(), ps[:2][:1:1], func(d Diff) { diffs = append(diffs, d) }); err != nil || diffs != nil {
		t.Errorf("one replica: %v %v", err, diffs)
	}
}
