package csi

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// Annotations CreateVolume puts on the QuorumVolumes it makes.
const (
	// AnnotationCSIName holds the CreateVolume request name the volume was
	// made for: the volume's name is derived from it, and a retry is only
	// the same volume when the names agree.
	AnnotationCSIName = "quorum.csi.dev/csi-name"
	// AnnotationFSType holds the fsType parameter, so that every answer
	// about the volume gives the node the same volume context.
	AnnotationFSType = "quorum.csi.dev/fs-type"
)

// hashedPrefixLen bounds the readable part of a hashed volume ID: with
// "-" and 16 hex digits it keeps the ID within a DNS-1123 label (63).
const hashedPrefixLen = 63 - 1 - 16

// volumeID derives the QuorumVolume name, which is also the CSI volume
// ID, from a CreateVolume request name, the same way every time so that
// retries find the volume. A name that is already a DNS-1123 label (the
// external-provisioner's "pvc-<uid>") is used as it is, so the
// QuorumVolume is named like its PersistentVolume. Any other name becomes
// its lower-cased, sanitized beginning plus 64 bits of its SHA-256, so
// two names never share an ID by accident; the annotation
// AnnotationCSIName catches the rest. A label, not the longer subdomain
// that object names allow, because the agents name replica images and
// NBD exports after it.
func volumeID(name string) string {
	if len(validation.IsDNS1123Label(name)) == 0 {
		return name
	}
	sum := sha256.Sum256([]byte(name))
	hash := hex.EncodeToString(sum[:8])
	prefix := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			return r
		case r >= 'A' && r <= 'Z':
			return r - 'A' + 'a'
		}
		return '-'
	}, name)
	if len(prefix) > hashedPrefixLen {
		prefix = prefix[:hashedPrefixLen]
	}
	prefix = strings.Trim(prefix, "-")
	if prefix == "" {
		return "vol-" + hash
	}
	return prefix + "-" + hash
}
