// Package replica keeps replica images on local disk. A replica is up to
// four files: PATH, a raw image holding the volume's bytes from offset 0
// (so QEMU, qemu-img and losetup read it as it is); PATH.qmeta beside it,
// the metadata that the engine persists about the replica (MetaSuffix,
// replaced atomically); PATH.qjournal, the volume's journal records
// (write intent and dirty maps) as this replica last saw them
// (JournalSuffix, journal.go); and PATH.qepoch, the newest attach epoch
// its replica server accepted (EpochSuffix, written by package nbd's
// EpochFile where the replica is served). Nothing of ours ever goes
// inside the image.
package replica

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/atomicfile"
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

// EpochSuffix names the file beside an image that keeps the newest
// attach epoch its replica server accepted (package nbd's EpochFile).
const EpochSuffix = ".qepoch"

// EpochPath names the epoch file of the image at path.
func EpochPath(path string) string { return path + EpochSuffix }

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
	return ParseMeta(b, path)
}

// ParseMeta decodes and checks metadata as stored (JSON), of the replica
// named where.
func ParseMeta(b []byte, where string) (Meta, error) {
	var m Meta
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("replica %s: metadata is corrupt: %w", where, err)
	}
	if m.Format != metaFormat {
		return m, fmt.Errorf("replica %s: metadata format %d, this build reads %d", where, m.Format, metaFormat)
	}
	if m.VolumeID == "" || m.ReplicaID == "" || m.Size <= 0 {
		return m, fmt.Errorf("replica %s: metadata lacks volume id, replica id or size", where)
	}
	return m, nil
}

// Marshal encodes m as it is stored.
func (m Meta) Marshal() []byte {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		panic(err) // Meta has only plain fields
	}
	return append(b, '\n')
}

// SameReplica reports whether n describes the same replica as m: only
// the generation and state may change after creation.
func (m Meta) SameReplica(n Meta) bool {
	return n.Format == m.Format && n.VolumeID == m.VolumeID && n.ReplicaID == m.ReplicaID &&
		n.Size == m.Size && n.Created.Equal(m.Created)
}

// writeMeta replaces the metadata atomically: a crash leaves either the
// old or the new file, never a torn one.
func writeMeta(path string, m Meta) error {
	if err := atomicfile.WriteFile(MetaPath(path), m.Marshal(), 0o600); err != nil {
		return fmt.Errorf("write metadata of %s: %w", path, err)
	}
	return nil
}

func newID() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}
