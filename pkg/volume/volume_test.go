package volume

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

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
	v, err := Open(context.Background(), ps, Options{})
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
	if _, err := Open(context.Background(), ps, Options{}); !errors.Is(err, replica.ErrInUse) {
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
	v, err = Open(context.Background(), ps, Options{})
	if err != nil {
		t.Fatal(err)
	}
	v.closeFiles()
	v, err = Open(context.Background(), ps, Options{})
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
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshot(t, dir)
			_, err := Open(context.Background(), tc.paths, tc.opts)
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

func waitInSync(t *testing.T, v *Volume) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ok := true
		for _, st := range v.Status() {
			ok = ok && st.State == quorum.ChildHealthy
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not in sync: %+v", v.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func assertSame(t *testing.T, ps []string) {
	t.Helper()
	var diffs []Diff
	if err := Compare(context.Background(), ps, func(d Diff) { diffs = append(diffs, d) }); err != nil {
		t.Fatal(err)
	}
	if len(diffs) > 0 {
		t.Fatalf("replicas differ: %+v", diffs)
	}
}

// small geometry: 4 KiB regions, 64 KiB extents, 4 of them active.
func small(o Options) Options {
	o.regionSize, o.extentSize, o.activeExtents = 4096, 64<<10, 4
	return o
}

// TestStaleReplicaResyncs: a replica that fails writes is recorded in
// the others' journals with what it missed; given again at the next
// attach it gets exactly those regions and ends identical.
func TestStaleReplicaResyncs(t *testing.T) {
	ps := newReplicas(t, t.TempDir(), 4<<20, "a", "b", "c")
	var bad *failingChild
	opts := small(Options{wrapChild: func(i int, c quorum.Child) quorum.Child {
		if i == 2 {
			bad = &failingChild{Child: c}
			return bad
		}
		return c
	}})
	ctx := context.Background()
	v, err := Open(ctx, ps, opts)
	if err != nil {
		t.Fatal(err)
	}
	bad.armed = true
	// Writes over more extents than the intent holds, so that part of
	// the dirty map reaches the journal through evictions.
	for i := range 40 {
		if err := v.WriteAt(ctx, bytes.Repeat([]byte{byte(i + 1)}, 4096), int64(i)*100<<10); err != nil {
			t.Fatalf("write with 2 of 3: %v", err)
		}
	}
	if err := v.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if m := meta(t, ps[2]); m.State != replica.StateOpen {
		t.Errorf("faulty replica marked %s", m.State)
	}
	var copied atomic.Int64
	v, err = Open(ctx, ps, small(Options{wrapChild: func(i int, c quorum.Child) quorum.Child {
		if i == 2 {
			return &countingChild{Child: c, written: &copied}
		}
		return c
	}}))
	if err != nil {
		t.Fatalf("reattach with the stale replica: %v", err)
	}
	if !slices.Equal(v.Stale, ps[2:]) {
		t.Errorf("stale = %v, want c", v.Stale)
	}
	waitInSync(t, v)
	if err := v.Close(ctx); err != nil {
		t.Fatal(err)
	}
	assertSame(t, ps)
	if n := copied.Load(); n != 40*4096 {
		t.Errorf("resync wrote %d bytes into c, want the 40 regions it missed (%d)", n, 40*4096)
	}
}

type countingChild struct {
	quorum.Child
	written *atomic.Int64
}

func (c *countingChild) WriteAt(ctx context.Context, p []byte, off int64) error {
	c.written.Add(int64(len(p)))
	return c.Child.WriteAt(ctx, p, off)
}

// TestLeftOutAndReplacement: a replica left out of an attach, and a new
// empty replacement, both get a full copy when given.
func TestLeftOutAndReplacement(t *testing.T) {
	dir := t.TempDir()
	ps := newReplicas(t, dir, 1<<20, "a", "b", "c")
	ctx := context.Background()
	v, err := Open(ctx, ps[:2], small(Options{}))
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{7}, 64<<10)
	v.WriteAt(ctx, data, 128<<10)
	v.Close(ctx)
	repl := filepath.Join(dir, "d")
	if err := replica.CreateReplacement([]string{repl}, ps[0]); err != nil {
		t.Fatal(err)
	}
	all := append(slices.Clone(ps), repl)
	v, err = Open(ctx, all, small(Options{}))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(v.Stale, []string{ps[2], repl}) {
		t.Errorf("stale = %v", v.Stale)
	}
	waitInSync(t, v)
	v.Close(ctx)
	assertSame(t, all)
}

// TestCrashRecoveryOnOpen: replicas that differ inside an extent active
// at a crash are made identical before Open returns; the first replica
// is the source.
func TestCrashRecoveryOnOpen(t *testing.T) {
	ps := newReplicas(t, t.TempDir(), 4<<20, "a", "b", "c")
	ctx := context.Background()
	v, err := Open(ctx, ps, small(Options{}))
	if err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(ctx, bytes.Repeat([]byte{1}, 8192), 1<<20); err != nil {
		t.Fatal(err)
	}
	// The crash: a write in flight reached only b, and nobody closed.
	f, _ := os.OpenFile(ps[1], os.O_WRONLY, 0)
	f.WriteAt(bytes.Repeat([]byte{2}, 4096), 1<<20)
	f.Close()
	v.Engine.Close()
	v.closeFiles()

	v, err = Open(ctx, ps, small(Options{}))
	if err != nil {
		t.Fatal(err)
	}
	st, err := v.Recovered(ctx)
	if err != nil || !slices.Equal(v.Unclean, ps) || st.Extents != 1 || st.Repaired != 64<<10 {
		t.Errorf("unclean %v, recovered %+v, %v: want all unclean and b's 64 KiB extent repaired", v.Unclean, st, err)
	}
	v.Close(ctx)
	assertSame(t, ps)
	if b, _ := os.ReadFile(ps[1]); b[1<<20] != 1 {
		t.Error("b kept the unacknowledged write instead of a's content")
	}
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
