package datapath

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/quorum-csi/quorum-csi/internal/atomicfile"
)

// recordVersion is the format of a Record on disk. A release reads every
// version up to its own and refuses newer ones with an error that says
// so, never guessing. Version 2 added Standby: a release before it would
// take a standby's replicas over at once, fencing the attach that still
// runs the volume, so it must not read such a record.
const recordVersion = 2

// Record is a staged volume as the node persists it: everything a
// restarted data path needs to take the volume's device back, and what
// the CSI node service needs to unstage and unpublish it after a restart.
type Record struct {
	Version int `json:"version"`
	StageRequest
	// Frontend made the device; Device is its path.
	Frontend string `json:"frontend"`
	Device   string `json:"device"`
	// Targets are the paths the volume is published at, each with
	// whether its publish was SINGLE_NODE_SINGLE_WRITER, which allows no
	// second target.
	Targets map[string]bool `json:"targets,omitempty"`
}

// StageRequest asks the data path to serve a volume as a block device.
type StageRequest struct {
	VolumeID string `json:"volumeID"`
	// Replicas in fifo order, the local one first: NBD URIs or local
	// image paths.
	Replicas         []string `json:"replicas"`
	Epoch            uint64   `json:"epoch"`
	VoteThreshold    int      `json:"voteThreshold"`
	ReadPattern      string   `json:"readPattern"`
	RewriteCorrupted bool     `json:"rewriteCorrupted,omitempty"`
	// StagingPath and Block are the CSI stage the device is for; the data
	// path only keeps them for the CSI node service.
	StagingPath string `json:"stagingPath"`
	Block       bool   `json:"block,omitempty"`
	// Standby stages a live migration's target while another node's
	// attach (with an older epoch) still writes: the device serves reads
	// and takes nothing over until its first write-class request or
	// Activate (volume.Options.Standby). In a record, true until the
	// volume was activated, so a successor serves it the same way.
	Standby bool `json:"standby,omitempty"`
}

// volumeIDPattern keeps a volume id usable as a file name.
var volumeIDPattern = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$`)

func checkVolumeID(id string) error {
	if !volumeIDPattern.MatchString(id) {
		return fmt.Errorf("volume id %q: want a DNS subdomain name (lower-case letters, digits, '-', '.')", id)
	}
	return nil
}

// store keeps one Record per staged volume, DIR/<volume>.json, each
// replaced atomically.
type store struct{ dir string }

func (s store) path(id string) string { return filepath.Join(s.dir, id+".json") }

func (s store) save(r Record) error {
	r.Version = recordVersion
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("record of volume %s: %w", r.VolumeID, err)
	}
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return fmt.Errorf("record of volume %s: %w", r.VolumeID, err)
	}
	if err := atomicfile.WriteFile(s.path(r.VolumeID), b, 0o600); err != nil {
		return fmt.Errorf("record of volume %s: %w", r.VolumeID, err)
	}
	return nil
}

func (s store) remove(id string) error {
	if err := os.Remove(s.path(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove record of volume %s: %w", id, err)
	}
	return atomicfile.SyncDir(s.dir)
}

// badRecord is a record file that cannot be used.
type badRecord struct {
	volumeID string // from the file name
	err      error
}

// load reads every record. Files that cannot be read, parsed or trusted
// come back as bad records, each with why, for the caller to report and
// clean up: one torn file must not stop the others from being served.
func (s store) load() ([]Record, []badRecord, error) {
	files, err := filepath.Glob(filepath.Join(s.dir, "*.json"))
	if err != nil {
		return nil, nil, err
	}
	var recs []Record
	var bad []badRecord
	for _, f := range files {
		id := strings.TrimSuffix(filepath.Base(f), ".json")
		r, err := readRecord(f)
		if err == nil && r.VolumeID != id {
			err = fmt.Errorf("names volume %q", r.VolumeID)
		}
		if err != nil {
			bad = append(bad, badRecord{volumeID: id, err: fmt.Errorf("state file %s: %w", f, err)})
			continue
		}
		recs = append(recs, r)
	}
	return recs, bad, nil
}

func readRecord(path string) (Record, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Record{}, err
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return Record{}, fmt.Errorf("corrupt: %w", err)
	}
	switch {
	case r.Version > recordVersion:
		return Record{}, fmt.Errorf("format version %d is newer than this release's %d: downgrading the data path is not supported", r.Version, recordVersion)
	case r.Version < 1:
		return Record{}, fmt.Errorf("no format version: not a data path record")
	case r.VolumeID == "" || len(r.Replicas) == 0 || r.Frontend == "" || r.Device == "":
		return Record{}, errors.New("incomplete: volume, replicas, frontend and device are required")
	}
	return r, nil
}
