package attach

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
)

// The FUSE wire protocol (include/uapi/linux/fuse.h), as much of it as
// a server of one file needs: requests are decoded and answers encoded
// here, in host byte order; fuseconn.go moves them over /dev/fuse and
// fuse.go decides what to answer.

var ne = binary.NativeEndian

const (
	fuseMajor = 7
	// fuseMinor is the newest protocol minor we speak: 7.40 added
	// FUSE_NOTIFY_RESEND, which a server taking a connection over needs.
	// No request or answer we use changed layout after 7.23.
	fuseMinor = 40

	inHeaderSize  = 40 // struct fuse_in_header
	outHeaderSize = 16 // struct fuse_out_header
	writeInSize   = 40 // struct fuse_write_in (since 7.9)
	initInSize    = 64 // struct fuse_init_in (since 7.36; older kernels send 16)
	initOutSize   = 64 // struct fuse_init_out (since 7.36)
	attrSize      = 88 // struct fuse_attr
	entryOutSize  = 40 + attrSize
	attrOutSize   = 16 + attrSize
	openOutSize   = 16
	writeOutSize  = 8
	statfsOutSize = 80
	direntSize    = 24 // struct fuse_dirent without its name

	// minReadBuffer is the smallest read of /dev/fuse the kernel takes
	// (FUSE_MIN_READ_BUFFER).
	minReadBuffer = 8192
)

// Opcodes (enum fuse_opcode).
const (
	opLookup      = 1
	opForget      = 2
	opGetattr     = 3
	opSetattr     = 4
	opOpen        = 14
	opRead        = 15
	opWrite       = 16
	opStatfs      = 17
	opRelease     = 18
	opFsync       = 20
	opFlush       = 25
	opInit        = 26
	opOpendir     = 27
	opReaddir     = 28
	opReleasedir  = 29
	opInterrupt   = 36
	opDestroy     = 38
	opBatchForget = 42
	opFallocate   = 43
)

// notifyResend (FUSE_NOTIFY_RESEND, 7.40) asks the kernel to queue again
// every request that was read from the connection and not answered.
const notifyResend = 7

// uniqueResend marks the unique of a request sent again after
// notifyResend (FUSE_UNIQUE_RESEND); the answer carries it unchanged.
const uniqueResend = 1 << 63

// INIT flags; bits 32 and up travel in the flags2 fields.
const (
	initAsyncRead = 1 << 0
	initBigWrites = 1 << 5
	initAsyncDIO  = 1 << 15
	initMaxPages  = 1 << 22
	initExt       = 1 << 30
	initHasResend = 1 << 39 // offered by kernels that take notifyResend
)

// OPEN answer flags.
const (
	fopenDirectIO             = 1 << 0
	fopenParallelDirectWrites = 1 << 6
)

const fattrSize = 1 << 3 // fuse_setattr_in.valid: size is set

var errShort = errors.New("fuse: message too short")

// inHeader is struct fuse_in_header.
type inHeader struct {
	Len         uint32
	Opcode      uint32
	Unique      uint64
	NodeID      uint64
	UID         uint32
	GID         uint32
	PID         uint32
	TotalExtlen uint16 // extensions after the arguments, in 8-byte units
}

// parseRequest splits one request as read from /dev/fuse into its
// header and its arguments (extensions cut off).
func parseRequest(b []byte) (inHeader, []byte, error) {
	if len(b) < inHeaderSize {
		return inHeader{}, nil, errShort
	}
	h := inHeader{
		Len:         ne.Uint32(b[0:]),
		Opcode:      ne.Uint32(b[4:]),
		Unique:      ne.Uint64(b[8:]),
		NodeID:      ne.Uint64(b[16:]),
		UID:         ne.Uint32(b[24:]),
		GID:         ne.Uint32(b[28:]),
		PID:         ne.Uint32(b[32:]),
		TotalExtlen: ne.Uint16(b[36:]),
	}
	if int(h.Len) != len(b) {
		return h, nil, fmt.Errorf("fuse: request says %d bytes, read %d", h.Len, len(b))
	}
	end := len(b) - 8*int(h.TotalExtlen)
	if end < inHeaderSize {
		return h, nil, fmt.Errorf("fuse: request of %d bytes with %d bytes of extensions", len(b), 8*int(h.TotalExtlen))
	}
	return h, b[inHeaderSize:end], nil
}

// initIn is struct fuse_init_in, flags and flags2 joined.
type initIn struct {
	Major        uint32
	Minor        uint32
	MaxReadahead uint32
	Flags        uint64
}

func parseInitIn(a []byte) (initIn, error) {
	if len(a) < 16 {
		return initIn{}, errShort
	}
	in := initIn{Major: ne.Uint32(a[0:]), Minor: ne.Uint32(a[4:]), MaxReadahead: ne.Uint32(a[8:]), Flags: uint64(ne.Uint32(a[12:]))}
	if in.Flags&initExt != 0 && len(a) >= 20 {
		in.Flags |= uint64(ne.Uint32(a[16:])) << 32
	}
	return in, nil
}

// initOut is struct fuse_init_out, flags and flags2 joined.
type initOut struct {
	Major               uint32
	Minor               uint32
	MaxReadahead        uint32
	Flags               uint64
	MaxBackground       uint16
	CongestionThreshold uint16
	MaxWrite            uint32
	TimeGran            uint32
	MaxPages            uint16
}

func (o initOut) put(b []byte) int {
	clear(b[:initOutSize])
	ne.PutUint32(b[0:], o.Major)
	ne.PutUint32(b[4:], o.Minor)
	ne.PutUint32(b[8:], o.MaxReadahead)
	ne.PutUint32(b[12:], uint32(o.Flags))
	ne.PutUint16(b[16:], o.MaxBackground)
	ne.PutUint16(b[18:], o.CongestionThreshold)
	ne.PutUint32(b[20:], o.MaxWrite)
	ne.PutUint32(b[24:], o.TimeGran)
	ne.PutUint16(b[28:], o.MaxPages)
	ne.PutUint32(b[32:], uint32(o.Flags>>32))
	return initOutSize
}

// ioIn is what READ and WRITE say where (struct fuse_read_in and the
// head of struct fuse_write_in have the same layout).
type ioIn struct {
	Offset uint64
	Size   uint32
}

func parseReadIn(a []byte) (ioIn, error) {
	if len(a) < 20 {
		return ioIn{}, errShort
	}
	return ioIn{Offset: ne.Uint64(a[8:]), Size: ne.Uint32(a[16:])}, nil
}

// parseWriteIn returns a WRITE's position and its data.
func parseWriteIn(a []byte) (ioIn, []byte, error) {
	if len(a) < writeInSize {
		return ioIn{}, nil, errShort
	}
	in := ioIn{Offset: ne.Uint64(a[8:]), Size: ne.Uint32(a[16:])}
	if len(a)-writeInSize < int(in.Size) {
		return in, nil, fmt.Errorf("fuse: write of %d bytes carries %d", in.Size, len(a)-writeInSize)
	}
	return in, a[writeInSize : writeInSize+int(in.Size)], nil
}

// parseSetattrIn returns the new size a SETATTR asks for, if it asks.
func parseSetattrIn(a []byte) (size uint64, setsSize bool, err error) {
	if len(a) < 24 {
		return 0, false, errShort
	}
	return ne.Uint64(a[16:]), ne.Uint32(a[0:])&fattrSize != 0, nil
}

// fallocateIn is struct fuse_fallocate_in without the file handle.
type fallocateIn struct {
	Offset uint64
	Length uint64
	Mode   uint32
}

func parseFallocateIn(a []byte) (fallocateIn, error) {
	if len(a) < 28 {
		return fallocateIn{}, errShort
	}
	return fallocateIn{Offset: ne.Uint64(a[8:]), Length: ne.Uint64(a[16:]), Mode: ne.Uint32(a[24:])}, nil
}

// parseName returns a LOOKUP's name (NUL terminated).
func parseName(a []byte) string {
	for i, c := range a {
		if c == 0 {
			return string(a[:i])
		}
	}
	return string(a)
}

// attr is the part of struct fuse_attr we fill; times stay zero.
type attr struct {
	Ino     uint64
	Size    uint64
	Blocks  uint64
	Mode    uint32
	Nlink   uint32
	Blksize uint32
}

func (a attr) put(b []byte) {
	clear(b[:attrSize])
	ne.PutUint64(b[0:], a.Ino)
	ne.PutUint64(b[8:], a.Size)
	ne.PutUint64(b[16:], a.Blocks)
	ne.PutUint32(b[60:], a.Mode)
	ne.PutUint32(b[64:], a.Nlink)
	ne.PutUint32(b[80:], a.Blksize)
}

// putEntryOut writes struct fuse_entry_out; valid is how many seconds
// the kernel may keep the name and the attributes.
func putEntryOut(b []byte, nodeID, generation, valid uint64, a attr) int {
	clear(b[:40])
	ne.PutUint64(b[0:], nodeID)
	ne.PutUint64(b[8:], generation)
	ne.PutUint64(b[16:], valid)
	ne.PutUint64(b[24:], valid)
	a.put(b[40:])
	return entryOutSize
}

// putAttrOut writes struct fuse_attr_out.
func putAttrOut(b []byte, valid uint64, a attr) int {
	clear(b[:16])
	ne.PutUint64(b[0:], valid)
	a.put(b[16:])
	return attrOutSize
}

// putOpenOut writes struct fuse_open_out.
func putOpenOut(b []byte, fh uint64, flags uint32) int {
	clear(b[:openOutSize])
	ne.PutUint64(b[0:], fh)
	ne.PutUint32(b[8:], flags)
	return openOutSize
}

// putWriteOut writes struct fuse_write_out.
func putWriteOut(b []byte, n uint32) int {
	clear(b[:writeOutSize])
	ne.PutUint32(b[0:], n)
	return writeOutSize
}

// statfs is the part of struct fuse_kstatfs we fill.
type statfs struct {
	Blocks  uint64
	Files   uint64
	Bsize   uint32
	NameLen uint32
	Frsize  uint32
}

func (s statfs) put(b []byte) int {
	clear(b[:statfsOutSize])
	ne.PutUint64(b[0:], s.Blocks)
	ne.PutUint64(b[24:], s.Files)
	ne.PutUint32(b[40:], s.Bsize)
	ne.PutUint32(b[44:], s.NameLen)
	ne.PutUint32(b[48:], s.Frsize)
	return statfsOutSize
}

// putDirent writes one struct fuse_dirent, padded to 8 bytes, and
// returns its size, or 0 if it does not fit in b.
func putDirent(b []byte, ino, off uint64, mode uint32, name string) int {
	n := (direntSize + len(name) + 7) &^ 7
	if n > len(b) {
		return 0
	}
	clear(b[:n])
	ne.PutUint64(b[0:], ino)
	ne.PutUint64(b[8:], off)
	ne.PutUint32(b[16:], uint32(len(name)))
	ne.PutUint32(b[20:], (mode&syscall.S_IFMT)>>12)
	copy(b[direntSize:], name)
	return n
}

// putOutHeader writes struct fuse_out_header for an answer of n bytes in
// all; errno is 0 for success.
func putOutHeader(b []byte, n int, errno syscall.Errno, unique uint64) {
	ne.PutUint32(b[0:], uint32(n))
	ne.PutUint32(b[4:], uint32(-int32(errno)))
	ne.PutUint64(b[8:], unique)
}

// putNotify writes an unsolicited notification without arguments
// (unique 0, the code in the error field).
func putNotify(b []byte, code int32) int {
	ne.PutUint32(b[0:], outHeaderSize)
	ne.PutUint32(b[4:], uint32(code))
	ne.PutUint64(b[8:], 0)
	return outHeaderSize
}
