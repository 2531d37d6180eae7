package replica

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/atomicfile"
)

// SizeAlign is the granularity of volume sizes: every block size a
// frontend or a replica's filesystem may use divides it.
const SizeAlign = 4096

// Create makes a new volume's replica images, sparse, with their metadata.
// It is all or nothing: it refuses if any path is taken, and on failure
// removes what it made.
func Create(paths []string, size int64) error {
	return create(paths, size, newID(), nil)
}

// CreateWithID makes one replica of a volume whose ids are chosen
// elsewhere: the node agent names a replica by its QuorumVolume's UID and
// the replica's name in the volume's status, so that the image on disk
// can be matched to the entry that asked for it. It refuses, like
// Create, if anything is in the way.
func CreateWithID(path string, size int64, volumeID, replicaID string) error {
	if volumeID == "" || replicaID == "" {
		return fmt.Errorf("create replica %s: volume id and replica id must not be empty", path)
	}
	return create([]string{path}, size, volumeID, []string{replicaID})
}

// CreateReplacement makes new replica images for the volume of an
// existing replica: they join that volume empty and get a full copy at
// their first attach.
func CreateReplacement(paths []string, like string) error {
	m, err := ReadMeta(like)
	if err != nil {
		return err
	}
	return create(paths, m.Size, m.VolumeID, nil)
}

// create makes the replicas at paths of volume volumeID; replicaIDs gives
// their ids in order, or is nil for random ones.
func create(paths []string, size int64, volumeID string, replicaIDs []string) error {
	if size <= 0 || size%SizeAlign != 0 {
		return fmt.Errorf("size %d: must be a positive multiple of %d bytes", size, SizeAlign)
	}
	if err := Distinct(paths); err != nil {
		return err
	}
	for _, p := range paths {
		for _, f := range []string{p, MetaPath(p), JournalPath(p)} {
			if _, err := os.Lstat(f); err == nil {
				return fmt.Errorf("replica %s: %s already exists; refusing to overwrite it", p, f)
			} else if !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("replica %s: %w", p, err)
			}
		}
	}
	now := time.Now().UTC().Truncate(time.Second)
	var made []string
	undo := func() {
		for _, f := range made {
			os.Remove(f)
		}
	}
	for i, p := range paths {
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			undo()
			return fmt.Errorf("create replica %s: %w", p, err)
		}
		made = append(made, p)
		err = f.Truncate(size)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			undo()
			return fmt.Errorf("create replica %s: %w", p, err)
		}
		id := newID()
		if replicaIDs != nil {
			id = replicaIDs[i]
		}
		m := Meta{Format: metaFormat, VolumeID: volumeID, ReplicaID: id, Size: size, State: StateClean, Created: now}
		made = append(made, MetaPath(p))
		if err := writeMeta(p, m); err != nil {
			undo()
			return fmt.Errorf("create replica %s: %w", p, err)
		}
	}
	for _, p := range paths {
		if err := atomicfile.SyncDir(filepath.Dir(p)); err != nil {
			undo()
			return err
		}
	}
	return nil
}

// Distinct refuses a list that names one file twice, by path or through a
// link.
func Distinct(paths []string) error {
	if len(paths) == 0 {
		return errors.New("no replica paths given")
	}
	seen := map[string]string{}
	var infos []os.FileInfo
	var infoPaths []string
	for _, p := range paths {
		abs, err := filepath.Abs(p)
		if err != nil {
			return fmt.Errorf("replica %s: %w", p, err)
		}
		if first, ok := seen[abs]; ok {
			return fmt.Errorf("replica %s given twice (as %s and %s)", abs, first, p)
		}
		seen[abs] = p
		if fi, err := os.Stat(p); err == nil {
			for i, o := range infos {
				if os.SameFile(fi, o) {
					return fmt.Errorf("replica %s given twice (%s and %s are the same file)", p, infoPaths[i], p)
				}
			}
			infos = append(infos, fi)
			infoPaths = append(infoPaths, p)
		}
	}
	return nil
}
