package nbd

import (
	"io"
	"math/bits"
	"net"
	"sync"
	"unsafe"
)

// MaxPayload is the largest read or write this package moves in one
// request: the server advertises it as its maximum block size, and the
// client splits larger requests. 32 MiB is what the protocol says no
// peer should treat as a denial of service, and what QEMU uses.
const MaxPayload = 32 << 20

// bufAlign is the memory alignment of pooled buffers: a page, so that a
// backend doing direct I/O (replica.File) can use them without copying
// through a bounce buffer.
const bufAlign = 4096

// Buffers come in power-of-two classes from 4 KiB to MaxPayload.
const (
	minBufShift = 12
	maxBufShift = 25
)

var bufPools [maxBufShift + 1]sync.Pool

// getBuf returns a page-aligned buffer of n bytes, n <= MaxPayload. Its
// contents are undefined.
func getBuf(n int) []byte {
	if n == 0 {
		return nil
	}
	k := max(bits.Len(uint(n-1)), minBufShift)
	if p, ok := bufPools[k].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	size := 1 << k
	raw := make([]byte, size+bufAlign)
	shift := 0
	if rem := uintptr(unsafe.Pointer(&raw[0])) % bufAlign; rem != 0 {
		shift = int(bufAlign - rem)
	}
	return raw[shift : shift+n : shift+size]
}

// putBuf returns a buffer from getBuf to its pool.
func putBuf(b []byte) {
	c := cap(b)
	if c == 0 {
		return
	}
	k := bits.TrailingZeros(uint(c))
	if c != 1<<k || k < minBufShift || k > maxBufShift {
		return // not ours
	}
	b = b[:c]
	bufPools[k].Put(&b)
}

// budget bounds what one connection may hold in flight: a number of
// requests and a number of payload bytes, so that a client queueing many
// large requests cannot make the server allocate without bound. It has
// a single acquirer (the connection's reader), so no fairness is needed.
type budget struct {
	mu              sync.Mutex
	cond            sync.Cond
	count, maxCount int
	bytes, maxBytes int64
	closed          bool
}

func newBudget(maxCount int, maxBytes int64) *budget {
	b := &budget{maxCount: maxCount, maxBytes: maxBytes}
	b.cond.L = &b.mu
	return b
}

// acquire waits until one more request of n bytes fits. A request larger
// than the whole byte budget is let through alone.
func (b *budget) acquire(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for !b.closed && b.count > 0 && (b.count >= b.maxCount || b.bytes+n > b.maxBytes) {
		b.cond.Wait()
	}
	if b.closed {
		return false
	}
	b.count++
	b.bytes += n
	return true
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.count--
	b.bytes -= n
	b.mu.Unlock()
	b.cond.Signal()
}

// close wakes the acquirer for good.
func (b *budget) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.cond.Broadcast()
}

// frameWriter buffers small frames and sends a large payload with the
// bytes buffered before it in one writev, without copying it: what
// bufio.Writer would split into two system calls and a 64 KiB copy. Its
// callers serialise it.
type frameWriter struct {
	w   io.Writer
	buf []byte
	err error
}

// bigPayload is the payload size from which frames go out at once,
// uncopied.
const bigPayload = 32 << 10

func newFrameWriter(w io.Writer) *frameWriter {
	return &frameWriter{w: w, buf: make([]byte, 0, 64<<10)}
}

func (f *frameWriter) reset(w io.Writer) { f.w, f.buf, f.err = w, f.buf[:0], nil }

// write queues hdr and data; a large data is written before it returns,
// so the caller may reuse it then.
func (f *frameWriter) write(hdr, data []byte) error {
	if f.err != nil {
		return f.err
	}
	if len(data) >= bigPayload {
		bufs := net.Buffers{f.buf, hdr, data}
		_, f.err = bufs.WriteTo(f.w)
		f.buf = f.buf[:0]
		return f.err
	}
	f.buf = append(append(f.buf, hdr...), data...)
	if len(f.buf) >= cap(f.buf) {
		return f.flush()
	}
	return nil
}

func (f *frameWriter) flush() error {
	if f.err == nil && len(f.buf) > 0 {
		_, f.err = f.w.Write(f.buf)
		f.buf = f.buf[:0]
	}
	return f.err
}
