package replica

import (
	"sync"

	"github.com/quorum-csi/quorum-csi/internal/alignbuf"
)

// Bounce buffers for callers whose memory is not aligned for direct I/O
// (the FUSE frontend hands us payloads at header offsets).
var alignedPool = sync.Pool{}

func getAligned(n int) []byte {
	if b, ok := alignedPool.Get().(*[]byte); ok && cap(*b) >= n {
		return (*b)[:n]
	}
	return alignbuf.Make(n, 128<<10)
}

func putAligned(b []byte) {
	b = b[:cap(b)]
	alignedPool.Put(&b)
}
