package attach

import (
	"context"
	"errors"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

const (
	rootID = fuse.FUSE_ROOT_ID
	fileID = 2
	// fileName is the one file in the mount, the loop device's backing file.
	fileName = "volume"
	// The kernel may cache names and attributes forever: nothing changes
	// them but us.
	cacheForever = uint64(365 * 24 * time.Hour / time.Second)
)

// fileSystem is a raw FUSE file system holding one file whose content is
// the volume. The raw API keeps the hot path to one call into the engine.
type fileSystem struct {
	fuse.RawFileSystem
	vol Volume
}

func newFileSystem(vol Volume) *fileSystem {
	return &fileSystem{RawFileSystem: fuse.NewDefaultRawFileSystem(), vol: vol}
}

func (fs *fileSystem) String() string { return "quorum" }

func (fs *fileSystem) attr(id uint64, a *fuse.Attr) {
	a.Ino = id
	a.Nlink = 1
	if id == rootID {
		a.Mode = syscall.S_IFDIR | 0o700
		return
	}
	a.Mode = syscall.S_IFREG | 0o600
	a.Size = uint64(fs.vol.Size())
	a.Blocks = a.Size / 512
	a.Blksize = 4096
}

func (fs *fileSystem) Lookup(_ <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	if h.NodeId != rootID || name != fileName {
		return fuse.ENOENT
	}
	out.NodeId = fileID
	out.Generation = 1
	out.SetEntryTimeout(time.Duration(cacheForever) * time.Second)
	out.SetAttrTimeout(time.Duration(cacheForever) * time.Second)
	fs.attr(fileID, &out.Attr)
	return fuse.OK
}

func (fs *fileSystem) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	if in.NodeId != rootID && in.NodeId != fileID {
		return fuse.ENOENT
	}
	out.SetTimeout(time.Duration(cacheForever) * time.Second)
	fs.attr(in.NodeId, &out.Attr)
	return fuse.OK
}

// SetAttr refuses size changes: a volume grows only through its replicas.
func (fs *fileSystem) SetAttr(_ <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	if in.NodeId != fileID {
		return fuse.EPERM
	}
	if sz, ok := in.GetSize(); ok && sz != uint64(fs.vol.Size()) {
		return fuse.EPERM
	}
	fs.attr(fileID, &out.Attr)
	return fuse.OK
}

func (fs *fileSystem) Open(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId != fileID {
		return fuse.EISDIR
	}
	// Direct I/O: no page cache in the FUSE layer; parallel direct writes:
	// the kernel does not serialise writes on the inode lock, the engine
	// orders overlapping ones itself.
	out.OpenFlags = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES
	return fuse.OK
}

func (fs *fileSystem) OpenDir(_ <-chan struct{}, in *fuse.OpenIn, _ *fuse.OpenOut) fuse.Status {
	if in.NodeId != rootID {
		return fuse.ENOTDIR
	}
	return fuse.OK
}

func (fs *fileSystem) ReadDir(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	if in.Offset == 0 {
		out.AddDirEntry(fuse.DirEntry{Name: fileName, Ino: fileID, Mode: syscall.S_IFREG, Off: 1})
	}
	return fuse.OK
}

func (fs *fileSystem) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	off, size := int64(in.Offset), fs.vol.Size()
	if off >= size {
		return fuse.ReadResultData(nil), fuse.OK
	}
	n := min(int64(in.Size), size-off)
	p := buf[:n]
	if err := fs.vol.ReadAt(cancelContext(cancel), p, off); err != nil {
		return nil, toStatus(err)
	}
	return fuse.ReadResultData(p), fuse.OK
}

func (fs *fileSystem) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	if err := fs.vol.WriteAt(cancelContext(cancel), data, int64(in.Offset)); err != nil {
		return 0, toStatus(err)
	}
	return uint32(len(data)), fuse.OK
}

func (fs *fileSystem) Fsync(cancel <-chan struct{}, _ *fuse.FsyncIn) fuse.Status {
	return toStatus(fs.vol.Flush(cancelContext(cancel)))
}

// Flush is close(2) on a file handle, not a durability request; loop's
// flushes arrive as Fsync.
func (fs *fileSystem) Flush(<-chan struct{}, *fuse.FlushIn) fuse.Status { return fuse.OK }

func (fs *fileSystem) Release(<-chan struct{}, *fuse.ReleaseIn) {}

func (fs *fileSystem) ReleaseDir(*fuse.ReleaseIn) {}

// Fallocate carries the loop device's discard and write-zeroes requests.
func (fs *fileSystem) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	ctx := cancelContext(cancel)
	off, length := int64(in.Offset), int64(in.Length)
	const (
		keep  = 0x01 // FALLOC_FL_KEEP_SIZE
		punch = 0x02 // FALLOC_FL_PUNCH_HOLE
		zero  = 0x10 // FALLOC_FL_ZERO_RANGE
	)
	switch in.Mode {
	case punch | keep:
		return toStatus(fs.vol.Discard(ctx, off, length))
	case zero, zero | keep:
		return toStatus(fs.vol.WriteZeroes(ctx, off, length))
	case 0, keep:
		// Plain allocation: the space is there once written; only refuse
		// growing the file.
		if off+length > fs.vol.Size() {
			return fuse.Status(syscall.EFBIG)
		}
		return fuse.OK
	}
	return fuse.ENOTSUP
}

func (fs *fileSystem) StatFs(_ <-chan struct{}, _ *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	out.Bsize = 4096
	out.Frsize = 4096
	out.Blocks = uint64(fs.vol.Size()) / 4096
	out.NameLen = 255
	out.Files = 2
	return fuse.OK
}

func toStatus(err error) fuse.Status {
	switch {
	case err == nil:
		return fuse.OK
	case errors.Is(err, quorum.ErrOutOfRange):
		return fuse.EINVAL
	case errors.Is(err, context.Canceled):
		return fuse.EINTR
	}
	return fuse.EIO
}

// cancelContext adapts go-fuse's per-request cancel channel to a context
// without a goroutine per request.
type cancelContext <-chan struct{}

func (c cancelContext) Deadline() (time.Time, bool) { return time.Time{}, false }
func (c cancelContext) Done() <-chan struct{}       { return c }
func (c cancelContext) Value(any) any               { return nil }
func (c cancelContext) Err() error {
	select {
	case <-c:
		return context.Canceled
	default:
		return nil
	}
}
