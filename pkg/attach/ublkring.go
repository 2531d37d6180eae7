package attach

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ublkRing is the small io_uring the ublk frontend drives by hand: the
// control commands need 128-byte entries, and each queue's commands
// must be issued from the one thread that serves the queue, which a
// shared ring (internal/uring) cannot promise. Not safe for concurrent
// use.
type ublkRing struct {
	fd      int
	mem     []byte
	sqeMem  []byte
	sqeSize uintptr
	sqTail  *uint32
	sqMask  uint32
	sqArray unsafe.Pointer
	cqHead  *uint32
	cqTail  *uint32
	cqMask  uint32
	cqes    unsafe.Pointer
	queued  uint32
}

const (
	ringSetupSQE128 = 1 << 10
	ringEnterGetEv  = 1
	ringOpRead      = 22
	ringOpURingCmd  = 46
)

type ringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  [10]uint32
	cqOff                                                                  [10]uint32
}

func newUblkRing(entries uint32, sqe128 bool) (*ublkRing, error) {
	var p ringParams
	if sqe128 {
		p.flags = ringSetupSQE128
	}
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &ublkRing{fd: int(fd), sqeSize: 64}
	if sqe128 {
		r.sqeSize = 128
	}
	if p.features&1 == 0 { // IORING_FEAT_SINGLE_MMAP
		unix.Close(r.fd)
		return nil, errors.New("io_uring: kernel lacks IORING_FEAT_SINGLE_MMAP")
	}
	// sqOff: head, tail, ring_mask, ring_entries, flags, dropped, array;
	// cqOff: head, tail, ring_mask, ring_entries, overflow, cqes.
	size := max(p.sqOff[6]+p.sqEntries*4, p.cqOff[5]+p.cqEntries*16)
	var err error
	if r.mem, err = unix.Mmap(r.fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		unix.Close(r.fd)
		return nil, fmt.Errorf("io_uring: map rings: %w", err)
	}
	if r.sqeMem, err = unix.Mmap(r.fd, 0x10000000, int(p.sqEntries)*int(r.sqeSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		unix.Munmap(r.mem)
		unix.Close(r.fd)
		return nil, fmt.Errorf("io_uring: map entries: %w", err)
	}
	base := unsafe.Pointer(&r.mem[0])
	r.sqTail = (*uint32)(unsafe.Add(base, p.sqOff[1]))
	r.sqMask = *(*uint32)(unsafe.Add(base, p.sqOff[2]))
	r.sqArray = unsafe.Add(base, p.sqOff[6])
	r.cqHead = (*uint32)(unsafe.Add(base, p.cqOff[0]))
	r.cqTail = (*uint32)(unsafe.Add(base, p.cqOff[1]))
	r.cqMask = *(*uint32)(unsafe.Add(base, p.cqOff[2]))
	r.cqes = unsafe.Add(base, p.cqOff[5])
	return r, nil
}

func (r *ublkRing) close() {
	unix.Munmap(r.sqeMem)
	unix.Munmap(r.mem)
	unix.Close(r.fd)
}

// next returns the next submission entry, zeroed, as bytes; it is handed
// to the kernel at the next enter.
func (r *ublkRing) next() []byte {
	tail := *r.sqTail
	idx := tail & r.sqMask
	e := r.sqeMem[uintptr(idx)*r.sqeSize : uintptr(idx+1)*r.sqeSize]
	clear(e)
	*(*uint32)(unsafe.Add(r.sqArray, uintptr(idx)*4)) = idx
	atomic.StoreUint32(r.sqTail, tail+1)
	r.queued++
	return e
}

// enter submits what is queued and waits for at least wait completions.
func (r *ublkRing) enter(wait uint32) error {
	for {
		var flags uintptr
		if wait > 0 {
			flags = ringEnterGetEv
		}
		n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(r.queued), uintptr(wait), flags, 0, 0)
		if errno == unix.EINTR {
			// Entries are taken before the wait, so an interrupted wait
			// still reports them; an interrupted submit took none.
			continue
		}
		if errno != 0 {
			return fmt.Errorf("io_uring_enter: %w", errno)
		}
		r.queued -= uint32(n)
		return nil
	}
}

// reap calls fn for every completion posted so far.
func (r *ublkRing) reap(fn func(userData uint64, res int32)) {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail)
	for ; head != tail; head++ {
		c := unsafe.Add(r.cqes, uintptr(head&r.cqMask)*16)
		ud, res := *(*uint64)(c), *(*int32)(unsafe.Add(c, 8))
		atomic.StoreUint32(r.cqHead, head+1)
		fn(ud, res)
	}
}

func putU16(b []byte, off int, v uint16) { *(*uint16)(unsafe.Pointer(&b[off])) = v }
func putU32(b []byte, off int, v uint32) { *(*uint32)(unsafe.Pointer(&b[off])) = v }
func putU64(b []byte, off int, v uint64) { *(*uint64)(unsafe.Pointer(&b[off])) = v }

// uringCmd fills a URING_CMD entry: cmd_op at 8, user_data at 32, the
// command's own bytes from 48.
func uringCmd(e []byte, fd int, op uint32, userData uint64, cmd []byte) {
	e[0] = ringOpURingCmd
	putU32(e, 4, uint32(fd))
	putU32(e, 8, op)
	putU64(e, 32, userData)
	copy(e[48:], cmd)
}
