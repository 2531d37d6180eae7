// Package replica keeps replica images on local disk. A replica is two
// files: PATH, a raw image holding the volume's bytes from offset 0 (so
// QEMU, qemu-img and losetup read it as it is), and PATH.qmeta beside it,
// the metadata that the engine persists about the replica. Nothing of ours
// ever goes inside the image.
package replica

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// MetaSuffix is appended to an image's path to name its metadata file.
const MetaSuffix = ".qmeta"

// metaFormat is bumped on any incompatible change of Meta.
const metaFormat = 1

// State says whether a replica was closed cleanly.
type State string

const (
	// StateClean: the last attach detached cleanly; the data is complete
	// for Generation.
	StateClean State = "clean"
	// StateOpen: an attach is running, or it died without detaching.
	StateOpen State = "open"
)

// Meta is what the engine persists about a replica.
type Meta struct {
	Format    int    `json:"format"`
	VolumeID  string `json:"volumeID"`
	ReplicaID string `json:"replicaID"`
	Size      int64  `json:"size"`
	// Generation counts attaches of the volume that this replica took
	// part in; a replica behind the others missed an attach's writes.
	Generation uint64    `json:"generation"`
	State      State     `json:"state"`
	Created    time.Time `json:"created"`
}

// MetaPath names the metadata file of the image at path.
func MetaPath(path string) string { return path + MetaSuffix }

// ReadMeta loads the metadata of the image at path.
func ReadMeta(path string) (Meta, error) {
	var m Meta
	b, err := os.ReadFile(MetaPath(path))
	if errors.Is(err, os.ErrNotExist) {
		if _, serr := os.Stat(path); serr != nil {
			return m, fmt.Errorf("replica %s: %w", path, serr)
		}
		return m, fmt.Errorf("replica %s: not a quorum replica: %s is missing (make replicas with quorumctl create)", path, MetaPath(path))
	}
	if err != nil {
		return m, fmt.Errorf("replica %s: read metadata: %w", path, err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("replica %s: metadata %s is corrupt: %w", path, MetaPath(path), err)
	}
	if m.Format != metaFormat {
		return m, fmt.Errorf("replica %s: metadata format %d, this build reads %d", path, m.Format, metaFormat)
	}
	if m.VolumeID == "" || m.ReplicaID == "" || m.Size <= 0 {
		return m, fmt.Errorf("replica %s: metadata %s lacks volume id, replica id or size", path, MetaPath(path))
	}
	return m, nil
}

// writeMeta replaces the metadata atomically: a crash leaves either the
// old or the new file, never a torn one.
func writeMeta(path string, m Meta) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	final := MetaPath(path)
	tmp, err := os.CreateTemp(filepath.Dir(final), filepath.Base(final)+".tmp*")
	if err != nil {
		return fmt.Errorf("write metadata of %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("write metadata of %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("sync metadata of %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write metadata of %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("write metadata of %s: %w", path, err)
	}
	return syncDir(filepath.Dir(final))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync folder %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync folder %s: %w", dir, err)
	}
	return nil
}

func newID() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}
