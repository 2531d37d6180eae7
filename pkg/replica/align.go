package replica

import (
	"sync"
	"unsafe"
)

// bounceAlign covers the memory alignment of direct I/O on every
// filesystem we expect (a page).
const bounceAlign = 4096

// Bounce buffers for callers whose memory is not aligned for direct I/O
// (the FUSE frontend hands us payloads at header offsets).
var alignedPool = sync.Pool{}

func getAligned(n int) []byte {
	if b, ok := alignedPool.Get().(*[]byte); ok && cap(*b) >= n {
		return (*b)[:n]
	}
	size := max(n, 128<<10)
	raw := make([]byte, size+bounceAlign)
	shift := 0
	if rem := uintptr(unsafe.Pointer(&raw[0])) % bounceAlign; rem != 0 {
		shift = int(bounceAlign - rem)
	}
	return raw[shift : shift+n : shift+size]
}

func putAligned(b []byte) {
	b = b[:cap(b)]
	alignedPool.Put(&b)
}
