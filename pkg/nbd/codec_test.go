package nbd

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io"
	"reflect"
	"strings"
	"syscall"
	"testing"
)

// unhex turns a spaced hex dump into bytes, so that expected frames read
// like the protocol document's field tables.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

// wireBytes writes v with write, checks that it wrote exactly want (hex,
// spaces ignored) and returns what read makes of those bytes.
func wireBytes[T any](t *testing.T, v T, want string, write func(io.Writer, T) error, read func(io.Reader) (T, error)) T {
	t.Helper()
	var buf bytes.Buffer
	if err := write(&buf, v); err != nil {
		t.Fatal(err)
	}
	if w := unhex(t, want); !bytes.Equal(buf.Bytes(), w) {
		t.Fatalf("\n got %x\nwant %x", buf.Bytes(), w)
	}
	got, err := read(&buf)
	if err != nil {
		t.Fatalf("read back: %v", err)
	}
	return got
}

func TestGreetingBytes(t *testing.T) {
	if f := wireBytes(t, FlagFixedNewstyle|FlagNoZeroes, "4e42444d41474943 49484156454f5054 0003", WriteGreeting, ReadGreeting); f != FlagFixedNewstyle|FlagNoZeroes {
		t.Fatalf("ReadGreeting = %v", f)
	}
	// An oldstyle server sends cliserv_magic instead of IHAVEOPT.
	old := unhex(t, "4e42444d41474943 0000420281861253 0000")
	if _, err := ReadGreeting(bytes.NewReader(old)); !isProtocolError(err) {
		t.Fatalf("oldstyle greeting: %v, want a protocol error", err)
	}

	var buf bytes.Buffer
	WriteClientFlags(&buf, FlagCFixedNewstyle|FlagCNoZeroes)
	if want := unhex(t, "00000003"); !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("client flags %x", buf.Bytes())
	}
	if cf, err := ReadClientFlags(&buf); err != nil || cf != 3 {
		t.Fatalf("ReadClientFlags = %v, %v", cf, err)
	}
}

func isProtocolError(err error) bool {
	var pe *ProtocolError
	return errors.As(err, &pe)
}

func TestOptionBytes(t *testing.T) {
	go7 := ExportRequest{Name: "disk", Infos: []InfoType{InfoBlockSize, InfoName}}
	tests := []struct {
		name string
		opt  OptionRequest
		want string
	}{
		{"structured reply", OptionRequest{Option: OptStructuredReply},
			"49484156454f5054 00000008 00000000"},
		{"go", OptionRequest{Option: OptGo, Data: go7.Append(nil)},
			"49484156454f5054 00000007 0000000e  00000004 6469736b 0002 0003 0001"},
		{"set meta context", OptionRequest{Option: OptSetMetaContext,
			Data: MetaContextRequest{Export: "d", Queries: []string{"base:allocation"}}.Append(nil)},
			"49484156454f5054 0000000a 0000001c  00000001 64 00000001 0000000f 626173653a616c6c6f636174696f6e"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := wireBytes(t, tt.opt, tt.want, WriteOption, func(r io.Reader) (OptionRequest, error) { return ReadOption(r, 1<<16) })
			if got.Option != tt.opt.Option || !bytes.Equal(got.Data, tt.opt.Data) {
				t.Fatalf("round trip: %+v, want %+v", got, tt.opt)
			}
		})
	}
	q, err := ParseExportRequest(go7.Append(nil))
	if err != nil || !reflect.DeepEqual(q, go7) {
		t.Fatalf("ParseExportRequest = %+v, %v", q, err)
	}
	m, err := ParseMetaContextRequest(tests[2].opt.Data)
	if err != nil || m.Export != "d" || len(m.Queries) != 1 || m.Queries[0] != MetaBaseAllocation {
		t.Fatalf("ParseMetaContextRequest = %+v, %v", m, err)
	}
}

func TestOptionLimits(t *testing.T) {
	// A length beyond the limit is refused before any data is read.
	hdr := unhex(t, "49484156454f5054 00000007 00010001")
	if _, err := ReadOption(bytes.NewReader(hdr), 1<<16); !isProtocolError(err) {
		t.Fatalf("oversized option: %v", err)
	}
	if _, err := ReadOption(bytes.NewReader(unhex(t, "49484156454f5054 00000007 00000004 0000")), 64); err != io.ErrUnexpectedEOF {
		t.Fatalf("cut option: %v, want unexpected EOF", err)
	}
	if _, err := ReadOption(bytes.NewReader(unhex(t, "0000000000000000 00000007 00000000")), 64); !isProtocolError(err) {
		t.Fatalf("bad magic: %v", err)
	}
	for _, bad := range []string{
		"",                             // nothing
		"00000005 6469",                // name longer than data
		"00000002 6469",                // no info count
		"00000002 6469 0002 0003",      // count says 2, one present
		"00000002 6400 0000",           // NUL in the name
		"00000002 c328 0000",           // not UTF-8
		"ffffffff 00",                  // absurd length
		"00000002 6469 0000 00",        // trailing byte
		"00000002 6469 0001 0003 0004", // count 1, two present
	} {
		if _, err := ParseExportRequest(unhex(t, bad)); !isProtocolError(err) {
			t.Errorf("ParseExportRequest(%s): %v, want a protocol error", bad, err)
		}
	}
	for _, bad := range []string{
		"00000000",                   // no query count
		"00000000 ffffffff",          // absurd count
		"00000000 00000001 00000005", // query longer than data
		"00000000 00000000 00",       // trailing byte
	} {
		if _, err := ParseMetaContextRequest(unhex(t, bad)); !isProtocolError(err) {
			t.Errorf("ParseMetaContextRequest(%s): %v, want a protocol error", bad, err)
		}
	}
}

func TestOptionReplyBytes(t *testing.T) {
	tests := []struct {
		name string
		rep  OptionReply
		want string
	}{
		{"ack", OptionReply{Option: OptStructuredReply, Type: RepAck},
			"0003e889045565a9 00000008 00000001 00000000"},
		{"info export", OptionReply{Option: OptGo, Type: RepInfo,
			Data: Info{Type: InfoExport, Size: 1 << 30, Flags: FlagHasFlags | FlagSendFlush}.Append(nil)},
			"0003e889045565a9 00000007 00000003 0000000c 0000 0000000040000000 0005"},
		{"info block size", OptionReply{Option: OptGo, Type: RepInfo,
			Data: Info{Type: InfoBlockSize, MinBlock: 512, PrefBlock: 4096, MaxBlock: 32 << 20}.Append(nil)},
			"0003e889045565a9 00000007 00000003 0000000e 0003 00000200 00001000 02000000"},
		{"server", OptionReply{Option: OptList, Type: RepServer, Data: AppendServerReply(nil, "a", "b")},
			"0003e889045565a9 00000003 00000002 00000006 00000001 61 62"},
		{"meta context", OptionReply{Option: OptSetMetaContext, Type: RepMetaContext,
			Data: AppendMetaContextReply(nil, 1, MetaBaseAllocation)},
			"0003e889045565a9 0000000a 00000004 00000013 00000001 626173653a616c6c6f636174696f6e"},
		{"tls required", OptionReply{Option: OptGo, Type: RepErrTLSReqd, Data: []byte("tls")},
			"0003e889045565a9 00000007 80000005 00000003 746c73"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := wireBytes(t, tt.rep, tt.want, WriteOptionReply, func(r io.Reader) (OptionReply, error) { return ReadOptionReply(r, 1<<16) })
			if !reflect.DeepEqual(got, tt.rep) {
				t.Fatalf("round trip: %+v, want %+v", got, tt.rep)
			}
		})
	}
	i, err := ParseInfo(tests[2].rep.Data)
	if err != nil || i.MinBlock != 512 || i.PrefBlock != 4096 || i.MaxBlock != 32<<20 {
		t.Fatalf("ParseInfo = %+v, %v", i, err)
	}
	i, err = ParseInfo(tests[1].rep.Data)
	if err != nil || i.Size != 1<<30 || i.Flags != FlagHasFlags|FlagSendFlush {
		t.Fatalf("ParseInfo = %+v, %v", i, err)
	}
	if i, err := ParseInfo(unhex(t, "0063 0102")); err != nil || i.Type != 99 {
		t.Fatalf("unknown info: %+v, %v (must be ignorable)", i, err)
	}
	if _, err := ParseInfo(unhex(t, "0000 00")); !isProtocolError(err) {
		t.Fatalf("short export info: %v", err)
	}
	if name, desc, err := ParseServerReply(tests[3].rep.Data); err != nil || name != "a" || desc != "b" {
		t.Fatalf("ParseServerReply = %q %q %v", name, desc, err)
	}
	if id, name, err := ParseMetaContextReply(tests[4].rep.Data); err != nil || id != 1 || name != MetaBaseAllocation {
		t.Fatalf("ParseMetaContextReply = %d %q %v", id, name, err)
	}
}

func TestExportNameReplyBytes(t *testing.T) {
	var buf bytes.Buffer
	WriteExportNameReply(&buf, 4096, FlagHasFlags, true)
	want := append(unhex(t, "0000000000001000 0001"), make([]byte, 124)...)
	if !bytes.Equal(buf.Bytes(), want) {
		t.Fatalf("got %x", buf.Bytes())
	}
	size, flags, err := ReadExportNameReply(&buf, true)
	if err != nil || size != 4096 || flags != FlagHasFlags || buf.Len() != 0 {
		t.Fatalf("ReadExportNameReply = %d %v %v (left %d)", size, flags, err, buf.Len())
	}
	buf.Reset()
	WriteExportNameReply(&buf, 4096, FlagHasFlags, false)
	if buf.Len() != 10 {
		t.Fatalf("no-zeroes reply of %d bytes", buf.Len())
	}
}

func TestRequestBytes(t *testing.T) {
	q := Request{Flags: CmdFlagFUA, Command: CmdWrite, Cookie: 0x0102030405060708, Offset: 1 << 20, Length: 4096}
	const wire = "25609513 0001 0001 0102030405060708 0000000000100000 00001000"
	if got := wireBytes(t, q, wire, WriteRequest, ReadRequest); got != q {
		t.Fatalf("round trip %+v", got)
	}
	want := unhex(t, wire)
	bad := append([]byte(nil), want...)
	bad[0] = 0x12 // the historic, reserved request magic
	if _, err := ReadRequest(bytes.NewReader(bad)); !isProtocolError(err) {
		t.Fatalf("bad magic: %v", err)
	}
	if _, err := ReadRequest(bytes.NewReader(want[:10])); err != io.ErrUnexpectedEOF {
		t.Fatalf("cut request: %v", err)
	}
	if _, err := ReadRequest(bytes.NewReader(nil)); err != io.EOF {
		t.Fatalf("no request: %v, want a clean EOF", err)
	}
}

func TestReplyBytes(t *testing.T) {
	tests := []struct {
		name  string
		frame []byte
		want  string
		hdr   ReplyHeader
	}{
		{"simple ok", AppendSimpleReply(nil, 7, 0),
			"67446698 00000000 0000000000000007",
			ReplyHeader{Cookie: 7}},
		{"simple EIO", AppendSimpleReply(nil, 7, EIO),
			"67446698 00000005 0000000000000007",
			ReplyHeader{Cookie: 7, Errno: EIO}},
		{"data chunk", AppendChunkHeader(nil, ReplyFlagDone, ChunkOffsetData, 9, 8+4096),
			"668e33ef 0001 0001 0000000000000009 00001008",
			ReplyHeader{Structured: true, Flags: ReplyFlagDone, Type: ChunkOffsetData, Cookie: 9, Length: 4104}},
		{"error chunk", AppendChunkHeader(nil, ReplyFlagDone, ChunkError, 9, 6),
			"668e33ef 0001 8001 0000000000000009 00000006",
			ReplyHeader{Structured: true, Flags: ReplyFlagDone, Type: ChunkError, Cookie: 9, Length: 6}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if want := unhex(t, tt.want); !bytes.Equal(tt.frame, want) {
				t.Fatalf("\n got %x\nwant %x", tt.frame, want)
			}
			got, err := ReadReplyHeader(bytes.NewReader(tt.frame))
			if err != nil || got != tt.hdr {
				t.Fatalf("ReadReplyHeader = %+v, %v; want %+v", got, err, tt.hdr)
			}
		})
	}
	if _, err := ReadReplyHeader(bytes.NewReader(unhex(t, "96744668 00000000 0000000000000007"))); !isProtocolError(err) {
		t.Fatalf("historic reply magic: %v", err)
	}
}

func TestChunkPayloads(t *testing.T) {
	e := ErrorChunk{Errno: ENOSPC, Message: "full"}
	p := AppendErrorChunk(nil, e)
	if want := unhex(t, "0000001c 0004 66756c6c"); !bytes.Equal(p, want) {
		t.Fatalf("error chunk %x", p)
	}
	if got, err := ParseErrorChunk(ChunkError, p); err != nil || got != e {
		t.Fatalf("ParseErrorChunk = %+v %v", got, err)
	}
	eo := ErrorChunk{Errno: EIO, Message: "x", HasOffset: true, Offset: 512}
	p = AppendErrorChunk(nil, eo)
	if want := unhex(t, "00000005 0001 78 0000000000000200"); !bytes.Equal(p, want) {
		t.Fatalf("error offset chunk %x", p)
	}
	if got, err := ParseErrorChunk(ChunkErrorOffset, p); err != nil || got != eo {
		t.Fatalf("ParseErrorChunk = %+v %v", got, err)
	}
	// An error type we do not know still yields its error value.
	if got, err := ParseErrorChunk(chunkErr|77, unhex(t, "00000001 0000 ffff")); err != nil || got.Errno != EPERM {
		t.Fatalf("unknown error chunk: %+v %v", got, err)
	}
	for _, bad := range []string{"0000", "00000005 0009 78", "00000000 0000"} {
		if _, err := ParseErrorChunk(ChunkError, unhex(t, bad)); !isProtocolError(err) {
			t.Errorf("ParseErrorChunk(%s): %v", bad, err)
		}
	}

	p = AppendOffsetHole(nil, 4096, 8192)
	if want := unhex(t, "0000000000001000 00002000"); !bytes.Equal(p, want) {
		t.Fatalf("hole %x", p)
	}
	if off, n, err := ParseOffsetHole(p); err != nil || off != 4096 || n != 8192 {
		t.Fatalf("ParseOffsetHole = %d %d %v", off, n, err)
	}
	if _, _, err := ParseOffsetHole(unhex(t, "0000000000001000 00000000")); !isProtocolError(err) {
		t.Fatalf("empty hole: %v", err)
	}

	ext := []Extent{{Length: 4096, Flags: 0}, {Length: 8192, Flags: StateHole | StateZero}}
	p = AppendBlockStatus(nil, 1, ext)
	if want := unhex(t, "00000001 00001000 00000000 00002000 00000003"); !bytes.Equal(p, want) {
		t.Fatalf("block status %x", p)
	}
	if id, got, err := ParseBlockStatus(p); err != nil || id != 1 || !reflect.DeepEqual(got, ext) {
		t.Fatalf("ParseBlockStatus = %d %v %v", id, got, err)
	}
	for _, bad := range []string{"00000001", "00000001 00001000", "00000001 00000000 00000000"} {
		if _, _, err := ParseBlockStatus(unhex(t, bad)); !isProtocolError(err) {
			t.Errorf("ParseBlockStatus(%s): %v", bad, err)
		}
	}
}

func TestErrno(t *testing.T) {
	err := error(&RequestError{Errno: EIO, Message: "disk on fire"})
	if !errors.Is(err, EIO) || !errors.Is(err, syscall.EIO) || errors.Is(err, syscall.EPERM) {
		t.Fatalf("RequestError does not match its errno: %v", err)
	}
	tests := []struct {
		in   error
		want Errno
	}{
		{syscall.ENOSPC, ENOSPC},
		{syscall.EDQUOT, ENOSPC},
		{syscall.EFBIG, ENOSPC},
		{syscall.EROFS, EPERM},
		{syscall.EINVAL, EINVAL},
		{errors.New("anything"), EIO},
		{EOVERFLOW, EOVERFLOW},
		{Errno(1234), EIO},
	}
	for _, tt := range tests {
		if got := errnoOf(tt.in); got != tt.want {
			t.Errorf("errnoOf(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestStrings(t *testing.T) {
	for _, tt := range []struct{ got, want string }{
		{OptGo.String(), "NBD_OPT_GO"},
		{Option(99).String(), "NBD_OPT_99"},
		{RepErrTLSReqd.String(), "NBD_REP_ERR_TLS_REQD"},
		{ReplyType(repErr | 50).String(), "NBD_REP_ERR(50)"},
		{CmdWriteZeroes.String(), "NBD_CMD_WRITE_ZEROES"},
		{(CmdFlagFUA | CmdFlagNoHole | 1<<9).String(), "FUA|NO_HOLE|0x200"},
		{(FlagHasFlags | FlagReadOnly).String(), "HAS_FLAGS|READ_ONLY"},
		{ChunkErrorOffset.String(), "NBD_REPLY_TYPE_ERROR_OFFSET"},
		{ChunkType(9).String(), "NBD_REPLY_TYPE_9"},
		{RepAck.String(), "NBD_REP_ACK"},
		{RepErrBlockSize.String(), "NBD_REP_ERR_BLOCK_SIZE_REQD"},
		{ReplyType(50).String(), "NBD_REP(50)"},
		{ENOSPC.Error(), "NBD_ENOSPC: no space left on device"},
		{Errno(1234).Error(), "NBD error 1234"},
		{Fenced.String(), "fenced"},
		{State(7).String(), "State(7)"},
		{State(-1).String(), "State(-1)"},
	} {
		if tt.got != tt.want {
			t.Errorf("got %q, want %q", tt.got, tt.want)
		}
	}
}
