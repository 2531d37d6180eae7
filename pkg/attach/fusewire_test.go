package attach

import (
	"bytes"
	"encoding/hex"
	"strings"
	"syscall"
	"testing"
)

// unhex reads bytes written as hex with spaces and newlines for layout.
func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseRequest(t *testing.T) {
	// A WRITE of 4 bytes at 0x1000 to node 2: header, fuse_write_in, data.
	req := unhex(t, `
		54000000 10000000 0700000000000080 0200000000000000
		00000000 00000000 2a000000 0000 0000
		0000000000000000 0010000000000000 04000000 00000000
		0000000000000000 00000000 00000000
		61626364`)
	h, args, err := parseRequest(req)
	if err != nil {
		t.Fatal(err)
	}
	want := inHeader{Len: 84, Opcode: opWrite, Unique: 7 | uniqueResend, NodeID: fileID, PID: 42}
	if h != want {
		t.Fatalf("header %+v, want %+v", h, want)
	}
	in, data, err := parseWriteIn(args)
	if err != nil || in != (ioIn{Offset: 0x1000, Size: 4}) || string(data) != "abcd" {
		t.Fatalf("write %+v %q %v", in, data, err)
	}
	if _, _, err := parseRequest(req[:83]); err == nil {
		t.Error("a request shorter than its header says was taken")
	}
	if _, _, err := parseWriteIn(args[:43]); err == nil {
		t.Error("a write with less data than it says was taken")
	}

	// Extensions (total_extlen, in 8-byte units) are not arguments.
	lookup := unhex(t, `
		38000000 01000000 0800000000000000 0100000000000000
		00000000 00000000 00000000 0100 0000
		766f6c756d6500 00
		0000000000000000`)
	h, args, err = parseRequest(lookup)
	if err != nil || h.Opcode != opLookup || parseName(args) != fileName || len(args) != 8 {
		t.Fatalf("lookup %+v %q %v", h, args, err)
	}
}

func TestParseArgs(t *testing.T) {
	init := unhex(t, `07000000 2d000000 00000200 00800040 80000000`)
	in, err := parseInitIn(init)
	if err != nil {
		t.Fatal(err)
	}
	if in != (initIn{Major: 7, Minor: 45, MaxReadahead: 0x20000, Flags: 0x40008000 | initHasResend}) {
		t.Fatalf("init %+v", in)
	}
	// Without FUSE_INIT_EXT flags2 is not there.
	in, _ = parseInitIn(unhex(t, `07000000 1f000000 00000200 00800000 80000000`))
	if in.Flags != initAsyncDIO {
		t.Fatalf("init flags %#x without INIT_EXT", in.Flags)
	}

	read := unhex(t, `0000000000000000 0000100000000000 00100000 00000000 0000000000000000 00000000 00000000`)
	if r, err := parseReadIn(read); err != nil || r != (ioIn{Offset: 1 << 20, Size: 4096}) {
		t.Fatalf("read %+v %v", r, err)
	}
	setattr := unhex(t, `08000000 00000000 0000000000000000 0000100000000000`)
	if size, sets, err := parseSetattrIn(setattr); err != nil || !sets || size != 1<<20 {
		t.Fatalf("setattr %d %v %v", size, sets, err)
	}
	falloc := unhex(t, `0000000000000000 0000200000000000 0000100000000000 03000000 00000000`)
	if f, err := parseFallocateIn(falloc); err != nil || f != (fallocateIn{Offset: 1 << 21, Length: 1 << 20, Mode: 3}) {
		t.Fatalf("fallocate %+v %v", f, err)
	}
}

func TestEncodeAnswers(t *testing.T) {
	for _, tc := range []struct {
		name string
		put  func([]byte) int
		want string
	}{
		{"init", func(b []byte) int {
			return initOut{Major: 7, Minor: 40, MaxReadahead: 0x20000, Flags: initAsyncDIO | initMaxPages,
				MaxBackground: 128, CongestionThreshold: 96, MaxWrite: 1 << 20, TimeGran: 1, MaxPages: 256}.put(b)
		}, `07000000 28000000 00000200 00804000 8000 6000 00001000 01000000 0001 0000 00000000
			00000000 00000000 00000000 00000000 00000000 00000000 00000000`},
		{"entry", func(b []byte) int {
			return putEntryOut(b, fileID, 1, 3600, attr{Ino: 0x123456789, Size: 1 << 30, Blocks: 1 << 21, Mode: syscall.S_IFREG | 0o600, Nlink: 1, Blksize: 4096})
		}, `0200000000000000 0100000000000000 100e000000000000 100e000000000000 00000000 00000000
			8967452301000000 0000004000000000 0000200000000000 0000000000000000 0000000000000000 0000000000000000
			00000000 00000000 00000000 80810000 01000000 00000000 00000000 00000000 00100000 00000000`},
		{"attr", func(b []byte) int {
			return putAttrOut(b, 60, attr{Ino: rootID, Mode: syscall.S_IFDIR | 0o700, Nlink: 1})
		}, `3c00000000000000 00000000 00000000
			0100000000000000 0000000000000000 0000000000000000 0000000000000000 0000000000000000 0000000000000000
			00000000 00000000 00000000 c0410000 01000000 00000000 00000000 00000000 00000000 00000000`},
		{"open", func(b []byte) int { return putOpenOut(b, 0, fopenDirectIO|fopenParallelDirectWrites) },
			`0000000000000000 41000000 00000000`},
		{"write", func(b []byte) int { return putWriteOut(b, 4096) }, `00100000 00000000`},
		{"statfs", func(b []byte) int {
			return statfs{Blocks: 256, Files: 2, Bsize: 4096, NameLen: 255, Frsize: 4096}.put(b)
		}, `0001000000000000 0000000000000000 0000000000000000 0200000000000000 0000000000000000
			00100000 ff000000 00100000 00000000 000000000000000000000000000000000000000000000000`},
		{"dirent", func(b []byte) int { return putDirent(b, 9, 1, syscall.S_IFREG, fileName) },
			`0900000000000000 0100000000000000 06000000 08000000 766f6c756d65 0000`},
		{"dirent that does not fit", func(b []byte) int { return putDirent(b[:31], 9, 1, syscall.S_IFREG, fileName) }, ``},
		{"header", func(b []byte) int { putOutHeader(b, 16, syscall.EIO, 7|uniqueResend); return 16 },
			`10000000 fbffffff 0700000000000080`},
		{"resend", func(b []byte) int { return putNotify(b, notifyResend) }, `10000000 07000000 0000000000000000`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := bytes.Repeat([]byte{0xee}, 256)
			n := tc.put(b)
			if want := unhex(t, tc.want); !bytes.Equal(b[:n], want) {
				t.Errorf("got  %x\nwant %x", b[:n], want)
			}
		})
	}
}
