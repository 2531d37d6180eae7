package attach

import (
	"context"
	"errors"
	"syscall"
	"time"

	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

const (
	rootID = 1
	fileID = 2
	// fileName is the one file in the mount, the loop device's backing file.
	fileName = "volume"
	// The kernel may cache names and attributes forever: nothing changes
	// them but us. It also keeps the loop device's LOOP_GET_STATUS64 from
	// asking the server for the inode number, so that the device can be
	// checked while no server runs.
	cacheForever = uint64(365 * 24 * time.Hour / time.Second)
)

// fileSystem answers the requests of a FUSE mount holding one file whose
// content is the volume. Every block request reaches the engine in the
// reader that took it from the kernel.
type fileSystem struct {
	vol Volume
	// ino is the file's inode number, chosen per device: with the FUSE
	// superblock's device number it names this connection's file among
	// all loop devices' backing files.
	ino uint64
}

func (fs *fileSystem) attr(id uint64) attr {
	if id == rootID {
		return attr{Ino: rootID, Mode: syscall.S_IFDIR | 0o700, Nlink: 1}
	}
	size := uint64(fs.vol.Size())
	return attr{Ino: fs.ino, Size: size, Blocks: size / 512, Mode: syscall.S_IFREG | 0o600, Nlink: 1, Blksize: 4096}
}

// serve answers one request. The answer is a slice of r's memory whose
// first outHeaderSize bytes are left for the header; with a non-zero
// errno the answer is that error alone; nil and 0: no answer (FORGET,
// INTERRUPT).
func (fs *fileSystem) serve(h inHeader, args []byte, r *reader) ([]byte, syscall.Errno) {
	out := r.out[:]
	body := out[outHeaderSize:]
	ctx := context.Background()
	switch h.Opcode {
	case opLookup:
		if h.NodeID != rootID || parseName(args) != fileName {
			return nil, syscall.ENOENT
		}
		return out[:outHeaderSize+putEntryOut(body, fileID, 1, cacheForever, fs.attr(fileID))], 0
	case opGetattr:
		if h.NodeID != rootID && h.NodeID != fileID {
			return nil, syscall.ENOENT
		}
		return out[:outHeaderSize+putAttrOut(body, cacheForever, fs.attr(h.NodeID))], 0
	case opSetattr:
		// A volume grows only through its replicas.
		if h.NodeID != fileID {
			return nil, syscall.EPERM
		}
		size, setsSize, err := parseSetattrIn(args)
		if err != nil {
			return nil, syscall.EINVAL
		}
		if setsSize && size != uint64(fs.vol.Size()) {
			return nil, syscall.EPERM
		}
		return out[:outHeaderSize+putAttrOut(body, cacheForever, fs.attr(fileID))], 0
	case opOpen:
		if h.NodeID != fileID {
			return nil, syscall.EISDIR
		}
		// Direct I/O: no page cache in the FUSE layer; parallel direct
		// writes: the kernel does not serialise writes on the inode lock,
		// the engine orders overlapping ones itself.
		return out[:outHeaderSize+putOpenOut(body, 0, fopenDirectIO|fopenParallelDirectWrites)], 0
	case opOpendir:
		if h.NodeID != rootID {
			return nil, syscall.ENOTDIR
		}
		return out[:outHeaderSize+putOpenOut(body, 0, 0)], 0
	case opReaddir:
		in, err := parseReadIn(args)
		if err != nil {
			return nil, syscall.EINVAL
		}
		n := 0
		if in.Offset == 0 {
			n = putDirent(body[:min(int(in.Size), len(body))], fs.ino, 1, syscall.S_IFREG, fileName)
		}
		return out[:outHeaderSize+n], 0
	case opRead:
		in, err := parseReadIn(args)
		if err != nil {
			return nil, syscall.EINVAL
		}
		off, size := int64(in.Offset), fs.vol.Size()
		if off >= size {
			return out[:outHeaderSize], 0
		}
		p := r.data(int(min(int64(in.Size), size-off, int64(len(r.buf)-dataAt))))
		if err := fs.vol.ReadAt(ctx, p, off); err != nil {
			return nil, toErrno(err)
		}
		return r.buf[dataAt-outHeaderSize : dataAt+len(p)], 0
	case opWrite:
		in, data, err := parseWriteIn(args)
		if err != nil {
			return nil, syscall.EINVAL
		}
		if err := fs.vol.WriteAt(ctx, data, int64(in.Offset)); err != nil {
			return nil, toErrno(err)
		}
		return out[:outHeaderSize+putWriteOut(body, in.Size)], 0
	case opFsync:
		if err := fs.vol.Flush(ctx); err != nil {
			return nil, toErrno(err)
		}
		return out[:outHeaderSize], 0
	case opFlush, opRelease, opReleasedir, opDestroy:
		// FLUSH is close(2) on a file handle, not a durability request;
		// loop's flushes arrive as FSYNC.
		return out[:outHeaderSize], 0
	case opFallocate:
		in, err := parseFallocateIn(args)
		if err != nil {
			return nil, syscall.EINVAL
		}
		return out[:outHeaderSize], fs.fallocate(ctx, in)
	case opStatfs:
		st := statfs{Blocks: uint64(fs.vol.Size()) / 4096, Files: 2, Bsize: 4096, NameLen: 255, Frsize: 4096}
		return out[:outHeaderSize+st.put(body)], 0
	case opForget, opBatchForget:
		return nil, 0
	case opInterrupt:
		// Loop's requests are asynchronous, nobody waits on them in a
		// way a signal could interrupt, and every engine request ends
		// on its own (the NBD timeouts): the interrupted request is
		// answered when it is done, as the protocol allows.
		return nil, 0
	}
	return nil, syscall.ENOSYS
}

// fallocate carries the loop device's discard and write-zeroes requests.
func (fs *fileSystem) fallocate(ctx context.Context, in fallocateIn) syscall.Errno {
	off, length := int64(in.Offset), int64(in.Length)
	const (
		keep  = 0x01 // FALLOC_FL_KEEP_SIZE
		punch = 0x02 // FALLOC_FL_PUNCH_HOLE
		zero  = 0x10 // FALLOC_FL_ZERO_RANGE
	)
	switch in.Mode {
	case punch | keep:
		return toErrno(fs.vol.Discard(ctx, off, length))
	case zero, zero | keep:
		return toErrno(fs.vol.WriteZeroes(ctx, off, length))
	case 0, keep:
		// Plain allocation: the space is there once written; only refuse
		// growing the file.
		if off+length > fs.vol.Size() {
			return syscall.EFBIG
		}
		return 0
	}
	return syscall.EOPNOTSUPP
}

func toErrno(err error) syscall.Errno {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, quorum.ErrOutOfRange):
		return syscall.EINVAL
	case errors.Is(err, context.Canceled):
		return syscall.EINTR
	}
	return syscall.EIO
}
