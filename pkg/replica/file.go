package replica

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/quorum-csi/quorum-csi/internal/uring"
)

// ErrInUse is wrapped when another process holds the replica.
var ErrInUse = errors.New("replica is in use by another process")

// ErrUnaligned is wrapped for requests whose offset or length the
// replica's filesystem cannot take with direct I/O.
var ErrUnaligned = errors.New("request not aligned for direct I/O")

// File is an open replica image. It implements quorum.Child with direct
// I/O, so that a write acknowledged after Flush is on the disk, not in this
// machine's page cache, and replicas do not double-cache the volume.
type File struct {
	path     string
	f        *os.File
	fd       int
	ring     *uring.Ring // nil: plain syscalls
	size     int64
	memAlign uintptr
	offAlign int64

	metaMu sync.Mutex
	meta   Meta

	// journal is opened at most once, then only read: nil until the
	// first record for a new replica, and for read-only opens.
	journalMu sync.Mutex
	journal   *os.File
}

// Open opens the replica at path for exclusive read-write use. It fails
// with ErrInUse while another process has it open.
func Open(path string) (*File, error) {
	return open(path, false)
}

// OpenReadOnly opens the replica for inspection, sharing it with other
// readers but not with a read-write user.
func OpenReadOnly(path string) (*File, error) {
	return open(path, true)
}

func open(path string, readOnly bool) (*File, error) {
	m, err := ReadMeta(path)
	if err != nil {
		return nil, err
	}
	flags, lock := os.O_RDWR, unix.LOCK_EX
	if readOnly {
		flags, lock = os.O_RDONLY, unix.LOCK_SH
	}
	f, err := os.OpenFile(path, flags|unix.O_DIRECT, 0)
	if err != nil {
		return nil, fmt.Errorf("replica %s: open with direct I/O: %w", path, err)
	}
	r := &File{path: path, f: f, fd: int(f.Fd()), meta: m}
	r.ring, _ = uring.Default()
	if err := r.init(lock); err != nil {
		f.Close()
		return nil, err
	}
	if !readOnly {
		if err := r.openJournal(false); err != nil {
			f.Close()
			return nil, err
		}
	}
	return r, nil
}

func (r *File) init(lock int) error {
	fd := r.fd
	if err := unix.Flock(fd, lock|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("replica %s: %w (is it attached already?)", r.path, ErrInUse)
		}
		return fmt.Errorf("replica %s: lock: %w", r.path, err)
	}
	var st unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_SIZE|unix.STATX_TYPE|unix.STATX_DIOALIGN, &st); err != nil {
		return fmt.Errorf("replica %s: statx: %w", r.path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("replica %s: not a regular file", r.path)
	}
	r.size = int64(st.Size)
	if r.size != r.meta.Size {
		return fmt.Errorf("replica %s: image is %d bytes but its metadata says %d", r.path, r.size, r.meta.Size)
	}
	if st.Mask&unix.STATX_DIOALIGN == 0 || st.Dio_offset_align == 0 {
		return fmt.Errorf("replica %s: its filesystem does not support direct I/O", r.path)
	}
	r.memAlign = uintptr(st.Dio_mem_align)
	r.offAlign = int64(st.Dio_offset_align)
	return nil
}

// Path is where the image lives.
func (r *File) Path() string { return r.path }

// Meta returns the replica's metadata as last loaded or written.
func (r *File) Meta() Meta {
	r.metaMu.Lock()
	defer r.metaMu.Unlock()
	return r.meta
}

// UpdateMeta applies fn to a copy of the metadata and persists it
// atomically; the in-memory copy changes only when that succeeded.
func (r *File) UpdateMeta(fn func(*Meta)) error {
	r.metaMu.Lock()
	defer r.metaMu.Unlock()
	m := r.meta
	fn(&m)
	if err := writeMeta(r.path, m); err != nil {
		return err
	}
	r.meta = m
	return nil
}

// Close releases the image and its lock.
func (r *File) Close() error {
	var jerr error
	if r.journal != nil {
		jerr = r.journal.Close()
	}
	if err := errors.Join(r.f.Close(), jerr); err != nil {
		return fmt.Errorf("close replica %s: %w", r.path, err)
	}
	return nil
}

// Size implements quorum.Child.
func (r *File) Size() int64 { return r.size }

func (r *File) check(ctx context.Context, off, length int64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if off%r.offAlign != 0 || length%r.offAlign != 0 {
		return fmt.Errorf("replica %s: offset %d length %d: %w to %d bytes", r.path, off, length, ErrUnaligned, r.offAlign)
	}
	if off < 0 || off+length > r.size {
		return fmt.Errorf("replica %s: offset %d length %d beyond %d bytes", r.path, off, length, r.size)
	}
	return nil
}

func (r *File) aligned(p []byte) bool {
	return len(p) == 0 || uintptr(unsafe.Pointer(&p[0]))%r.memAlign == 0
}

// ReadAt implements quorum.Child.
func (r *File) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := r.check(ctx, off, int64(len(p))); err != nil {
		return err
	}
	if r.aligned(p) {
		return r.pread(p, off)
	}
	b := getAligned(len(p))
	defer putAligned(b)
	if err := r.pread(b, off); err != nil {
		return err
	}
	copy(p, b)
	return nil
}

func (r *File) pread(p []byte, off int64) error {
	if r.ring != nil {
		n, err := r.ring.Pread(r.fd, p, off)
		if err != nil {
			return fmt.Errorf("replica %s: read at %d: %w", r.path, off+int64(n), err)
		}
		if n < len(p) {
			return fmt.Errorf("replica %s: read at %d: unexpected end of image", r.path, off+int64(n))
		}
		return nil
	}
	for len(p) > 0 {
		n, err := unix.Pread(r.fd, p, off)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return fmt.Errorf("replica %s: read at %d: %w", r.path, off, err)
		}
		if n == 0 {
			return fmt.Errorf("replica %s: read at %d: unexpected end of image", r.path, off)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// WriteAt implements quorum.Child.
func (r *File) WriteAt(ctx context.Context, p []byte, off int64) error {
	if err := r.check(ctx, off, int64(len(p))); err != nil {
		return err
	}
	if !r.aligned(p) {
		b := getAligned(len(p))
		defer putAligned(b)
		copy(b, p)
		p = b
	}
	if r.ring != nil {
		if n, err := r.ring.Pwrite(r.fd, p, off); err != nil {
			return fmt.Errorf("replica %s: write at %d: %w", r.path, off+int64(n), err)
		}
		return nil
	}
	for len(p) > 0 {
		n, err := unix.Pwrite(r.fd, p, off)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return fmt.Errorf("replica %s: write at %d: %w", r.path, off, err)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// Flush implements quorum.Child.
func (r *File) Flush(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var err error
	if r.ring != nil {
		err = r.ring.Fdatasync(r.fd)
	} else {
		err = unix.Fdatasync(r.fd)
	}
	if err != nil {
		return fmt.Errorf("replica %s: flush: %w", r.path, err)
	}
	return nil
}

// Discard implements quorum.Child by punching a hole, which keeps the
// image sparse and reads back as zeroes.
func (r *File) Discard(ctx context.Context, off, length int64) error {
	return r.fallocate(ctx, "discard", unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

// WriteZeroes implements quorum.Child: the range reads as zeroes and stays
// allocated.
func (r *File) WriteZeroes(ctx context.Context, off, length int64) error {
	return r.fallocate(ctx, "write zeroes", unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

func (r *File) fallocate(ctx context.Context, what string, mode uint32, off, length int64) error {
	if err := r.check(ctx, off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	if err := unix.Fallocate(r.fd, mode, off, length); err != nil {
		return fmt.Errorf("replica %s: %s at %d length %d: %w", r.path, what, off, length, err)
	}
	return nil
}

// BlockSize is the offset and length granularity the image takes.
func (r *File) BlockSize() int64 { return r.offAlign }

// IOMethod says how replicas do their I/O in this process: io_uring, or
// plain system calls when the kernel or a seccomp policy refuses io_uring.
func IOMethod() string {
	if _, err := uring.Default(); err != nil {
		return fmt.Sprintf("pread/pwrite (io_uring unavailable: %v)", err)
	}
	return "io_uring"
}
