package volume

import (
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

// GrowReplica extends a replica that is not open to size bytes
// (replica.Grow), moving its journal for the slot size that attaches and
// the sidecar export use at the new size.
func GrowReplica(path string, size int64) error {
	return replica.Grow(path, size, func(volumeSize int64) int64 {
		return slotSize(volumeSize, quorum.DefaultRegionSize, quorum.DefaultActiveExtents)
	})
}
