package quorum

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// contents maps a label to block content; "err" makes the child's read
// fail instead.
var contents = map[string]byte{"a": 0xaa, "b": 0xbb, "c": 0xcc}

// setup gives child i the content labels[i] at [0, 512).
func setupReads(r *rig, labels []string) {
	for i, l := range labels {
		if l == "err" {
			r.kids[i].inject = failOn(OpRead)
			continue
		}
		copy(r.kids[i].data, pattern(contents[l], 512))
	}
}

// readVersion reads the first 512 bytes through r's engine, which must
// return the version want (a label of contents) or, when want is "",
// fail with a quorum failure. It returns the events the read must have
// reported: REPORT_BAD for each child of bad, and QUORUM_FAILURE.
func readVersion(t *testing.T, r *rig, want string, bad []string) []string {
	t.Helper()
	p := make([]byte, 512)
	err := r.e.ReadAt(context.Background(), p, 0)
	var events []string
	for _, b := range bad {
		events = append(events, "REPORT_BAD:"+b)
	}
	if want == "" {
		if !errors.Is(err, ErrQuorumFailure) {
			t.Fatalf("err = %v, want quorum failure", err)
		}
		return append(events, "QUORUM_FAILURE")
	}
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(p, pattern(contents[want], 512)) {
		t.Fatalf("read %x..., want version %s", p[:4], want)
	}
	return events
}

func TestQuorumRead(t *testing.T) {
	tests := []struct {
		labels    []string
		threshold int
		want      string   // winning label, or "" for QUORUM_FAILURE
		bad       []string // children reported bad
	}{
		{[]string{"a", "a", "a"}, 3, "a", nil},
		{[]string{"a", "a", "a"}, 1, "a", nil},
		{[]string{"a", "a", "b"}, 2, "a", []string{"c2"}},
		{[]string{"b", "a", "a"}, 2, "a", []string{"c0"}},
		{[]string{"a", "a", "b"}, 3, "", nil},
		{[]string{"a", "b", "c"}, 2, "", nil},
		{[]string{"a", "b", "c"}, 1, "a", []string{"c1", "c2"}},
		// Ties go to the version of the child that comes first.
		{[]string{"a", "b"}, 1, "a", []string{"c1"}},
		{[]string{"b", "a"}, 1, "b", []string{"c1"}},
		{[]string{"a", "b", "b", "a"}, 2, "a", []string{"c1", "c2"}},
		{[]string{"b", "a", "a", "b"}, 2, "b", []string{"c1", "c2"}},
		{[]string{"a", "b", "b", "a"}, 3, "", nil},
		// The most votes win even when another version also reaches t.
		{[]string{"a", "b", "b", "b", "a"}, 2, "b", []string{"c0", "c4"}},
		// Read errors do not vote; too few successes is a failure.
		{[]string{"a", "err", "a"}, 2, "a", []string{"c1"}},
		{[]string{"err", "err", "a"}, 2, "", []string{"c0", "c1"}},
		{[]string{"err", "err", "a"}, 1, "a", []string{"c0", "c1"}},
		{[]string{"err", "a", "b"}, 1, "a", []string{"c0", "c2"}},
		{[]string{"a", "err", "b"}, 2, "", []string{"c1"}},
		{[]string{"err"}, 1, "", []string{"c0"}},
		{[]string{"a"}, 1, "a", nil},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%v/t=%d", tc.labels, tc.threshold), func(t *testing.T) {
			r := newRig(t, len(tc.labels), 4096, Config{VoteThreshold: tc.threshold})
			setupReads(r, tc.labels)
			want := readVersion(t, r, tc.want, tc.bad)
			got := r.events.summary()
			slices.Sort(got)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("events = %v, want %v", got, want)
			}
			for i := range tc.labels {
				if r.e.Faulty(i) {
					t.Errorf("a read made child %d faulty", i)
				}
			}
		})
	}
}

func TestRewriteCorrupted(t *testing.T) {
	tests := []struct {
		labels    []string
		threshold int
		rewritten []int
	}{
		{[]string{"a", "a", "b"}, 2, []int{2}},
		{[]string{"b", "a", "a"}, 2, []int{0}},
		{[]string{"a", "b", "c"}, 1, []int{1, 2}},
		{[]string{"a", "a", "a"}, 2, nil},
		// No winner: nothing is rewritten.
		{[]string{"a", "b", "c"}, 2, nil},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%v/t=%d", tc.labels, tc.threshold), func(t *testing.T) {
			r := newRig(t, len(tc.labels), 4096, Config{VoteThreshold: tc.threshold, RewriteCorrupted: true})
			setupReads(r, tc.labels)
			before := make([]int, len(r.kids))
			for i, k := range r.kids {
				before[i] = k.count(OpWrite)
			}
			_ = r.e.ReadAt(context.Background(), make([]byte, 512), 0)
			var rewritten []int
			for i, k := range r.kids {
				if k.count(OpWrite) > before[i] {
					rewritten = append(rewritten, i)
				}
			}
			if !slices.Equal(rewritten, tc.rewritten) {
				t.Fatalf("rewritten children = %v, want %v", rewritten, tc.rewritten)
			}
			if tc.rewritten != nil {
				r.assertIdentical(t)
			}
		})
	}
}

func TestRewriteFailureMakesLoserFaulty(t *testing.T) {
	r := newRig(t, 3, 4096, Config{RewriteCorrupted: true})
	setupReads(r, []string{"a", "a", "b"})
	r.kids[2].inject = failOn(OpWrite)
	p := make([]byte, 512)
	if err := r.e.ReadAt(context.Background(), p, 0); err != nil {
		t.Fatalf("read: %v", err)
	}
	if !bytes.Equal(p, pattern(0xaa, 512)) || !r.e.Faulty(2) {
		t.Fatalf("read %x, faulty(2)=%v", p[:2], r.e.Faulty(2))
	}
}

func TestStrict(t *testing.T) {
	tests := []struct {
		labels []string
		ok     bool
	}{
		{[]string{"a", "a"}, true},
		{[]string{"a", "b"}, false},
		{[]string{"a", "a", "b"}, false},
		{[]string{"a", "err"}, false},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprint(tc.labels), func(t *testing.T) {
			r := newRig(t, len(tc.labels), 4096, Config{VoteThreshold: 1, Strict: true})
			setupReads(r, tc.labels)
			err := r.e.ReadAt(context.Background(), make([]byte, 512), 0)
			if tc.ok != (err == nil) {
				t.Fatalf("err = %v, want ok=%v", err, tc.ok)
			}
			if !tc.ok {
				if !strings.Contains(err.Error(), "strict mode") {
					t.Errorf("err = %v, want it to name strict mode", err)
				}
				if got := r.events.summary(); !slices.Contains(got, "QUORUM_FAILURE") {
					t.Errorf("events = %v, want a QUORUM_FAILURE", got)
				}
			}
		})
	}
}

func TestFIFORead(t *testing.T) {
	tests := []struct {
		labels  []string
		faulty  []int
		want    string
		readsOf []int // children that were read
		bad     []string
	}{
		{labels: []string{"a", "b", "c"}, want: "a", readsOf: []int{0}},
		{labels: []string{"err", "b", "c"}, want: "b", readsOf: []int{0, 1}, bad: []string{"c0"}},
		{labels: []string{"err", "err", "c"}, want: "c", readsOf: []int{0, 1, 2}, bad: []string{"c0", "c1"}},
		{labels: []string{"err", "err", "err"}, want: "", readsOf: []int{0, 1, 2}, bad: []string{"c0", "c1", "c2"}},
		{labels: []string{"a", "b", "c"}, faulty: []int{0}, want: "b", readsOf: []int{1}},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%v/faulty=%v", tc.labels, tc.faulty), func(t *testing.T) {
			r := newRig(t, len(tc.labels), 4096, Config{VoteThreshold: 1, ReadPattern: ReadPatternFIFO})
			for _, i := range tc.faulty {
				r.e.fault(i, OpWrite, 0, 512, errInjected)
			}
			r.events.Reset()
			setupReads(r, tc.labels)
			want := readVersion(t, r, tc.want, tc.bad)
			var read []int
			for i, k := range r.kids {
				if k.count(OpRead) > 0 {
					read = append(read, i)
				}
			}
			if !slices.Equal(read, tc.readsOf) {
				t.Errorf("children read = %v, want %v", read, tc.readsOf)
			}
			if got := r.events.summary(); !slices.Equal(got, want) {
				t.Errorf("events = %v, want %v", got, want)
			}
		})
	}
}

func TestEventCarriesRange(t *testing.T) {
	r := newRig(t, 3, 8192, Config{})
	setupReads(r, []string{"a", "a", "a"})
	copy(r.kids[1].data[4096:], pattern(1, 1024))
	_ = r.e.ReadAt(context.Background(), make([]byte, 1024), 4096)
	want := Event{Type: EventReportBad, Op: OpRead, Offset: 4096, Length: 1024, Child: "c1", Error: "content lost the vote"}
	if ev := r.events.All(); len(ev) != 1 || ev[0] != want {
		t.Fatalf("events = %+v, want [%+v]", ev, want)
	}
}
