package datapath

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestStoreRoundTrip(t *testing.T) {
	s := store{dir: filepath.Join(t.TempDir(), "volumes")}
	want := Record{
		StageRequest: StageRequest{VolumeID: "pvc-1", Replicas: []string{"nbds://a/x", "nbds://b/x"}, Epoch: 3,
			VoteThreshold: 2, ReadPattern: "fifo", StagingPath: "/staging", Block: true},
		Frontend: "fuse-loop", Device: "/dev/loop3", Targets: map[string]bool{"/t": true},
	}
	if err := s.save(want); err != nil {
		t.Fatal(err)
	}
	recs, bad, err := s.load()
	if err != nil || len(bad) != 0 || len(recs) != 1 {
		t.Fatalf("load: %v, bad %v, %d records", err, bad, len(recs))
	}
	want.Version = recordVersion
	if !reflect.DeepEqual(recs[0], want) {
		t.Errorf("loaded %+v, want %+v", recs[0], want)
	}
	if err := s.remove("pvc-1"); err != nil {
		t.Fatal(err)
	}
	if err := s.remove("pvc-1"); err != nil {
		t.Errorf("removing a missing record: %v", err)
	}
	if recs, _, _ := s.load(); len(recs) != 0 {
		t.Errorf("records after remove: %+v", recs)
	}
}

// TestStoreRefuses: each unusable file is reported by itself, with why,
// and does not keep the good ones from loading.
func TestStoreRefuses(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "volumes")
	s := store{dir: dir}
	if err := s.save(Record{StageRequest: StageRequest{VolumeID: "good", Replicas: []string{"r"}}, Frontend: "ublk", Device: "/dev/ublkb0"}); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"torn":    `{"version":1,"volumeID":"to`,
		"newer":   `{"version":99,"volumeID":"newer","replicas":["r"],"frontend":"ublk","device":"/dev/ublkb1"}`,
		"old":     `{"volumeID":"old","replicas":["r"],"frontend":"ublk","device":"/dev/ublkb1"}`,
		"partial": `{"version":1,"volumeID":"partial"}`,
		"renamed": `{"version":1,"volumeID":"other","replicas":["r"],"frontend":"ublk","device":"/dev/ublkb1"}`,
	}
	for id, content := range files {
		if err := os.WriteFile(filepath.Join(dir, id+".json"), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	recs, bad, err := s.load()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 1 || recs[0].VolumeID != "good" {
		t.Errorf("good records %+v, want the one good one", recs)
	}
	why := map[string]string{}
	for _, b := range bad {
		why[b.volumeID] = b.err.Error()
	}
	for id, want := range map[string]string{
		"torn": "corrupt", "newer": "newer than this release", "old": "no format version",
		"partial": "incomplete", "renamed": `names volume "other"`,
	} {
		if !strings.Contains(why[id], want) {
			t.Errorf("%s: %q, want it to say %q", id, why[id], want)
		}
	}
}

func TestCheckVolumeID(t *testing.T) {
	for id, ok := range map[string]bool{
		"pvc-0b6c6f7e-1d1b-4b43-9d1b-8a2f1f3f6c1a": true, "vol1": true, "a.b": true,
		"": false, "../etc": false, "a/b": false, "Upper": false, "-x": false, strings.Repeat("a", 254): false,
	} {
		if err := checkVolumeID(id); (err == nil) != ok {
			t.Errorf("checkVolumeID(%q) = %v, want ok %t", id, err, ok)
		}
	}
}
