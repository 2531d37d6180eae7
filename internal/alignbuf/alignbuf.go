// Package alignbuf allocates memory aligned for direct I/O.
package alignbuf

import "unsafe"

// Align is a page: it covers the memory alignment direct I/O needs on
// every filesystem and device we expect.
const Align = 4096

// Make returns n bytes starting on an Align boundary, with capacity for
// at least c bytes (c < n means n).
func Make(n, c int) []byte {
	c = max(c, n)
	raw := make([]byte, c+Align)
	off := int(-uintptr(unsafe.Pointer(&raw[0])) % Align)
	return raw[off : off+n : off+c]
}
