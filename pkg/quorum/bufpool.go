package quorum

import (
	"math/bits"
	"sync"
)

// Vote buffers come from per-size-class pools: a quorum read needs N-1 of
// them per request, and allocating them would dominate small reads.
const (
	minClass = 12 // 4 KiB
	maxClass = 22 // 4 MiB
)

var pools [maxClass + 1]sync.Pool

func class(n int) int {
	c := bits.Len(uint(n - 1))
	if c < minClass {
		c = minClass
	}
	return c
}

func getBuf(n int) []byte {
	c := class(n)
	if c > maxClass {
		return make([]byte, n)
	}
	if b, ok := pools[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<c)
}

func putBuf(b []byte) {
	c := class(cap(b))
	if c > maxClass || cap(b) != 1<<c {
		return
	}
	b = b[:cap(b)]
	pools[c].Put(&b)
}
