package alignbuf

import (
	"testing"
	"unsafe"
)

func TestMake(t *testing.T) {
	for _, tc := range []struct{ n, c int }{{1, 0}, {4096, 0}, {100, 1 << 20}, {5000, 10}} {
		b := Make(tc.n, tc.c)
		if uintptr(unsafe.Pointer(&b[0]))%Align != 0 || len(b) != tc.n || cap(b) < max(tc.n, tc.c) {
			t.Errorf("Make(%d, %d): len %d cap %d at %p", tc.n, tc.c, len(b), cap(b), &b[0])
		}
	}
}
