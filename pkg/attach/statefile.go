package attach

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/quorum-csi/quorum-csi/internal/atomicfile"
)

// fuseLoopStateVersion is the version of the fuse-loop state file this
// build writes and reads.
const fuseLoopStateVersion = 1

// fuseLoopState is what a process needs to take a fuse-loop device
// over: which loop device, how to recognise that it still sits on the
// same FUSE connection, where that connection is kept, and what its INIT
// settled (the kernel sends INIT only once per connection).
type fuseLoopState struct {
	Version int `json:"version"`
	// Loop is N of /dev/loopN.
	Loop int `json:"loop"`
	// LoopDevice and LoopInode are the backing file's device and inode
	// numbers as LOOP_GET_STATUS64 reports them (lo_device, lo_inode):
	// the FUSE superblock's device and the inode number chosen for the
	// connection's file.
	LoopDevice uint64 `json:"loopDevice"`
	LoopInode  uint64 `json:"loopInode"`
	// Holder is the name under which descriptor holders keep the
	// connection's /dev/fuse descriptor.
	Holder string `json:"holder"`
	// Size is the volume's size in bytes, as the kernel knows the file.
	Size int64      `json:"size"`
	FUSE fuseParams `json:"fuse"`
}

func (s fuseLoopState) loopID() loopID { return loopID{Device: s.LoopDevice, Inode: s.LoopInode} }

// readFUSELoopState reads path; a missing file wraps os.ErrNotExist.
func readFUSELoopState(path string) (fuseLoopState, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return fuseLoopState{}, err
	}
	var v struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return fuseLoopState{}, fmt.Errorf("state file %s is corrupt: %w", path, err)
	}
	if v.Version != fuseLoopStateVersion {
		return fuseLoopState{}, fmt.Errorf("state file %s has version %d; this build reads version %d", path, v.Version, fuseLoopStateVersion)
	}
	var s fuseLoopState
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&s); err != nil {
		return fuseLoopState{}, fmt.Errorf("state file %s is corrupt: %w", path, err)
	}
	if s.Loop < 0 || s.Holder == "" || s.Size <= 0 || s.FUSE.MaxWrite < 4096 || s.FUSE.Minor == 0 {
		return fuseLoopState{}, fmt.Errorf("state file %s is corrupt: %s", path, b)
	}
	return s, nil
}

func writeFUSELoopState(path string, s fuseLoopState) error {
	s.Version = fuseLoopStateVersion
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, append(b, '\n'), 0o600)
}

// removeState removes a state file; a missing one is fine.
func removeState(path string) error {
	if path == "" {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}
