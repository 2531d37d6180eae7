// Package uring is a minimal io_uring for direct file I/O from many
// goroutines. Go runs every blocking pread/pwrite on its own OS thread and
// hands processors back and forth around it, which on a small machine
// costs more than the I/O itself at high queue depths. Here submissions
// are one non-blocking io_uring_enter each, and completions wake a single
// reaper goroutine through an eventfd in Go's netpoller, so no thread
// blocks on the disk.
//
// Only what the replicas need: read, write and fsync on a file
// descriptor, one ring per process, at most Entries requests in flight.
package uring

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	opFsync = 3
	opRead  = 22
	opWrite = 23

	fsyncDatasync = 1

	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000

	featSingleMmap  = 1
	enterGetEvents  = 1
	registerEventfd = 4
)

type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqringOffsets
	cqOff                                                                  cqringOffsets
}

type sqe struct {
	opcode   uint8
	flags    uint8
	ioprio   uint16
	fd       int32
	off      uint64
	addr     uint64
	len      uint32
	opFlags  uint32
	userData uint64
	bufIndex uint16
	personal uint16
	spliceFD int32
	addr3    uint64
	pad      uint64
}

type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

// Entries is the submission queue size and the in-flight limit.
const Entries = 256

// op is a slot for one request in flight; the reaper sends the result
// (bytes, or -errno) on done.
type op struct {
	done chan int32
}

// Ring is an io_uring shared by all callers.
type Ring struct {
	fd      int
	sqMem   []byte
	cqMem   []byte
	sqeMem  []byte
	sqTail  *uint32
	sqMask  uint32
	sqArray unsafe.Pointer
	sqes    unsafe.Pointer
	cqHead  *uint32
	cqTail  *uint32
	cqMask  uint32
	cqes    unsafe.Pointer

	submitMu   sync.Mutex
	queued     uint32 // entries in the ring not yet handed to the kernel
	submitting bool   // someone is in io_uring_enter for the queued entries
	ops        [Entries]op
	free       chan uint32 // free op slots; also bounds the requests in flight
	event      *os.File
}

var (
	defaultOnce sync.Once
	defaultRing *Ring
	defaultErr  error
)

// Default returns the process's ring, made on first use, or why io_uring
// cannot be used here.
func Default() (*Ring, error) {
	defaultOnce.Do(func() { defaultRing, defaultErr = New() })
	return defaultRing, defaultErr
}

// New sets up a ring.
func New() (*Ring, error) {
	var p params
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, Entries, uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &Ring{fd: int(fd), free: make(chan uint32, Entries)}
	if err := r.mmap(&p); err != nil {
		r.unmap()
		unix.Close(r.fd)
		return nil, err
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		r.unmap()
		unix.Close(r.fd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	efd32 := int32(efd)
	if _, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerEventfd, uintptr(unsafe.Pointer(&efd32)), 1, 0, 0); errno != 0 {
		unix.Close(efd)
		r.unmap()
		unix.Close(r.fd)
		return nil, fmt.Errorf("io_uring_register eventfd: %w", errno)
	}
	// A non-blocking fd makes os.NewFile use the netpoller.
	r.event = os.NewFile(uintptr(efd), "io_uring-eventfd")
	for i := range r.ops {
		r.ops[i].done = make(chan int32, 1)
		r.free <- uint32(i)
	}
	go r.reap()
	return r, nil
}

func (r *Ring) mmap(p *params) error {
	if p.features&featSingleMmap == 0 {
		return errors.New("io_uring: kernel lacks IORING_FEAT_SINGLE_MMAP (5.4+)")
	}
	sqSize := int(p.sqOff.array + p.sqEntries*4)
	cqSize := int(p.cqOff.cqes + p.cqEntries*uint32(unsafe.Sizeof(cqe{})))
	size := max(sqSize, cqSize)
	var err error
	r.sqMem, err = unix.Mmap(r.fd, offSQRing, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("io_uring: map rings: %w", err)
	}
	r.cqMem = r.sqMem
	r.sqeMem, err = unix.Mmap(r.fd, offSQEs, int(p.sqEntries)*int(unsafe.Sizeof(sqe{})), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("io_uring: map submission entries: %w", err)
	}
	base := unsafe.Pointer(&r.sqMem[0])
	r.sqTail = (*uint32)(unsafe.Add(base, p.sqOff.tail))
	r.sqMask = *(*uint32)(unsafe.Add(base, p.sqOff.ringMask))
	r.sqArray = unsafe.Add(base, p.sqOff.array)
	r.sqes = unsafe.Pointer(&r.sqeMem[0])
	r.cqHead = (*uint32)(unsafe.Add(base, p.cqOff.head))
	r.cqTail = (*uint32)(unsafe.Add(base, p.cqOff.tail))
	r.cqMask = *(*uint32)(unsafe.Add(base, p.cqOff.ringMask))
	r.cqes = unsafe.Add(base, p.cqOff.cqes)
	return nil
}

func (r *Ring) unmap() {
	if r.sqMem != nil {
		unix.Munmap(r.sqMem)
	}
	if r.sqeMem != nil {
		unix.Munmap(r.sqeMem)
	}
}

// reap delivers completions. It sleeps in the netpoller on the eventfd,
// which the kernel signals after posting completions; every wake drains
// the whole completion queue, so a signal that arrives during a drain at
// worst causes an empty one.
func (r *Ring) reap() {
	var buf [8]byte
	for {
		if _, err := r.event.Read(buf[:]); err != nil {
			if errors.Is(err, syscall.EAGAIN) {
				continue
			}
			return
		}
		head := atomic.LoadUint32(r.cqHead)
		tail := atomic.LoadUint32(r.cqTail)
		for ; head != tail; head++ {
			c := (*cqe)(unsafe.Add(r.cqes, uintptr(head&r.cqMask)*unsafe.Sizeof(cqe{})))
			done, res := r.ops[c.userData].done, c.res
			// Publish the head before waking the waiter: its slot may be
			// reused at once, and its completion needs room.
			atomic.StoreUint32(r.cqHead, head+1)
			done <- res
		}
	}
}

// submit queues one request and waits for its result (bytes, or
// -errno). Whoever finds no submission under way becomes the submitter
// and hands the kernel everything queued, including entries queued by
// others while it was in io_uring_enter: under load one system call
// carries many requests.
func (r *Ring) submit(fill func(*sqe)) int32 {
	slot := <-r.free
	r.submitMu.Lock()
	tail := *r.sqTail
	idx := tail & r.sqMask
	s := (*sqe)(unsafe.Add(r.sqes, uintptr(idx)*unsafe.Sizeof(sqe{})))
	*s = sqe{userData: uint64(slot)}
	fill(s)
	*(*uint32)(unsafe.Add(r.sqArray, uintptr(idx)*4)) = idx
	atomic.StoreUint32(r.sqTail, tail+1)
	r.queued++
	if !r.submitting {
		r.submitting = true
		for r.queued > 0 {
			n := r.queued
			r.queued = 0
			r.submitMu.Unlock()
			done, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(n), 0, 0, 0, 0)
			r.submitMu.Lock()
			switch errno {
			case 0:
			case unix.EINTR, unix.EAGAIN, unix.EBUSY:
				done = 0 // nothing taken; try again
			default:
				// A valid ring with at most Entries in flight has no other
				// failure; carrying on would hang every request.
				panic(fmt.Sprintf("io_uring_enter: %v", errno))
			}
			r.queued += n - uint32(done)
		}
		r.submitting = false
	}
	r.submitMu.Unlock()
	res := <-r.ops[slot].done
	r.free <- slot
	return res
}

func errnoOf(res int32) error {
	return syscall.Errno(-res)
}

// Pread reads len(p) bytes at off from fd, looping over short reads.
// It returns the bytes read; fewer than len(p) only at end of file.
func (r *Ring) Pread(fd int, p []byte, off int64) (int, error) {
	return r.rw(opRead, fd, p, off)
}

// Pwrite writes all of p at off to fd.
func (r *Ring) Pwrite(fd int, p []byte, off int64) (int, error) {
	return r.rw(opWrite, fd, p, off)
}

func (r *Ring) rw(opcode uint8, fd int, p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		rest := p[done:]
		res := r.submit(func(s *sqe) {
			s.opcode = opcode
			s.fd = int32(fd)
			s.off = uint64(off + int64(done))
			s.addr = uint64(uintptr(unsafe.Pointer(&rest[0])))
			s.len = uint32(len(rest))
		})
		runtime.KeepAlive(rest)
		switch {
		case res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN):
			continue
		case res < 0:
			return done, errnoOf(res)
		case res == 0:
			return done, nil
		}
		done += int(res)
	}
	return done, nil
}

// Fdatasync flushes fd's data to stable storage.
func (r *Ring) Fdatasync(fd int) error {
	for {
		res := r.submit(func(s *sqe) {
			s.opcode = opFsync
			s.fd = int32(fd)
			s.opFlags = fsyncDatasync
		})
		if res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN) {
			continue
		}
		if res < 0 {
			return errnoOf(res)
		}
		return nil
	}
}
