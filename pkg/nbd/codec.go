package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// The codec: pure encoding and decoding of NBD frames over io.Reader and
// io.Writer, with no connection state. Readers return a *ProtocolError for
// bytes that cannot be a valid frame (bad magic, impossible lengths) and
// io.ErrUnexpectedEOF for a frame cut short; either ends a connection.
// Option and chunk payloads are decoded from byte slices by Parse*
// functions and built by Append* functions, so that callers can bound
// payload sizes before reading them.

var be = binary.BigEndian

// readFull is io.ReadFull with a clean EOF only before the first byte.
func readFull(r io.Reader, b []byte) error {
	_, err := io.ReadFull(r, b)
	return err
}

// WriteGreeting writes the server's newstyle greeting.
func WriteGreeting(w io.Writer, f HandshakeFlags) error {
	var b [greetingSize]byte
	be.PutUint64(b[0:], magicInit)
	be.PutUint64(b[8:], magicOpt)
	be.PutUint16(b[16:], uint16(f))
	_, err := w.Write(b[:])
	return err
}

// ReadGreeting reads the server's newstyle greeting. Oldstyle servers are
// refused: they cannot name exports, negotiate TLS or structured replies.
func ReadGreeting(r io.Reader) (HandshakeFlags, error) {
	var b [greetingSize]byte
	if err := readFull(r, b[:]); err != nil {
		return 0, err
	}
	if m := be.Uint64(b[0:]); m != magicInit {
		return 0, protoErrorf("greeting magic %#x, want NBDMAGIC", m)
	}
	if m := be.Uint64(b[8:]); m != magicOpt {
		return 0, protoErrorf("greeting magic %#x, want IHAVEOPT (oldstyle servers are not supported)", m)
	}
	return HandshakeFlags(be.Uint16(b[16:])), nil
}

// WriteClientFlags writes the client's answer to the greeting.
func WriteClientFlags(w io.Writer, f ClientFlags) error {
	var b [4]byte
	be.PutUint32(b[:], uint32(f))
	_, err := w.Write(b[:])
	return err
}

// ReadClientFlags reads the client's answer to the greeting.
func ReadClientFlags(r io.Reader) (ClientFlags, error) {
	var b [4]byte
	if err := readFull(r, b[:]); err != nil {
		return 0, err
	}
	return ClientFlags(be.Uint32(b[:])), nil
}

// OptionRequest is an option sent by the client during the handshake.
type OptionRequest struct {
	Option Option
	Data   []byte
}

// WriteOption writes an option request.
func WriteOption(w io.Writer, o OptionRequest) error {
	return writeOptionMessage(w, magicOpt, o.Data, uint32(o.Option))
}

// ReadOption reads an option request whose data is at most maxData bytes.
// A longer one is a *ProtocolError and its data is left unread.
func ReadOption(r io.Reader, maxData uint32) (OptionRequest, error) {
	var b [optionHeaderSize]byte
	if err := readOptionHeader(r, b[:], magicOpt, "option magic %#x, want IHAVEOPT"); err != nil {
		return OptionRequest{}, err
	}
	o := OptionRequest{Option: Option(be.Uint32(b[8:]))}
	var err error
	o.Data, err = readOptionData(r, b[:], maxData, o.Option)
	return o, err
}

// OptionReply is one reply of the server to an option.
type OptionReply struct {
	Option Option
	Type   ReplyType
	Data   []byte
}

// WriteOptionReply writes an option reply.
func WriteOptionReply(w io.Writer, rep OptionReply) error {
	return writeOptionMessage(w, magicOptReply, rep.Data, uint32(rep.Option), uint32(rep.Type))
}

// ReadOptionReply reads an option reply whose data is at most maxData
// bytes.
func ReadOptionReply(r io.Reader, maxData uint32) (OptionReply, error) {
	var b [optionReplyHdrSize]byte
	if err := readOptionHeader(r, b[:], magicOptReply, "option reply magic %#x"); err != nil {
		return OptionReply{}, err
	}
	rep := OptionReply{Option: Option(be.Uint32(b[8:])), Type: ReplyType(be.Uint32(b[12:]))}
	var err error
	rep.Data, err = readOptionData(r, b[:], maxData, optionReplyName{rep.Option, rep.Type})
	return rep, err
}

// optionReplyName names an option reply in errors, formatted only when
// one is.
type optionReplyName struct {
	option Option
	reply  ReplyType
}

func (n optionReplyName) String() string { return fmt.Sprintf("%v reply %v", n.option, n.reply) }

// writeOptionMessage writes an option request or reply: magic, the
// header's fields, the data's length and the data, in one write.
func writeOptionMessage(w io.Writer, magic uint64, data []byte, fields ...uint32) error {
	b := make([]byte, 0, 8+4*len(fields)+4+len(data))
	b = be.AppendUint64(b, magic)
	for _, f := range fields {
		b = be.AppendUint32(b, f)
	}
	b = be.AppendUint32(b, uint32(len(data)))
	_, err := w.Write(append(b, data...))
	return err
}

// readOptionHeader reads the header of an option request or reply into
// hdr, which must start with magic (else a *ProtocolError that
// badMagic formats).
func readOptionHeader(r io.Reader, hdr []byte, magic uint64, badMagic string) error {
	if err := readFull(r, hdr); err != nil {
		return err
	}
	if m := be.Uint64(hdr); m != magic {
		return protoErrorf(badMagic, m)
	}
	return nil
}

// readOptionData reads the data that follows an option request's or
// reply's header hdr, whose last four bytes give its length. More than
// maxData bytes is a *ProtocolError naming the message what, and the
// data is left unread.
func readOptionData(r io.Reader, hdr []byte, maxData uint32, what fmt.Stringer) ([]byte, error) {
	n := be.Uint32(hdr[len(hdr)-4:])
	if n > maxData {
		return nil, protoErrorf("%v with %d bytes of data, limit %d", what, n, maxData)
	}
	if n == 0 {
		return nil, nil
	}
	data := make([]byte, n)
	if err := readFull(r, data); err != nil {
		return nil, unexpected(err)
	}
	return data, nil
}

// ExportRequest is the data of NBD_OPT_INFO and NBD_OPT_GO.
type ExportRequest struct {
	Name  string
	Infos []InfoType
}

// Append appends the wire form of q to b.
func (q ExportRequest) Append(b []byte) []byte {
	b = appendString32(b, q.Name)
	b = be.AppendUint16(b, uint16(len(q.Infos)))
	for _, i := range q.Infos {
		b = be.AppendUint16(b, uint16(i))
	}
	return b
}

// ParseExportRequest decodes the data of NBD_OPT_INFO or NBD_OPT_GO.
func ParseExportRequest(data []byte) (ExportRequest, error) {
	name, rest, err := takeString32(data, "export name")
	if err != nil {
		return ExportRequest{}, err
	}
	if len(rest) < 2 {
		return ExportRequest{}, protoErrorf("export request without information count")
	}
	n := int(be.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*n {
		return ExportRequest{}, protoErrorf("export request lists %d information items in %d bytes", n, len(rest))
	}
	q := ExportRequest{Name: name}
	for i := 0; i < n; i++ {
		q.Infos = append(q.Infos, InfoType(be.Uint16(rest[2*i:])))
	}
	return q, nil
}

// MetaContextRequest is the data of NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT.
type MetaContextRequest struct {
	Export  string
	Queries []string
}

// Append appends the wire form of q to b.
func (q MetaContextRequest) Append(b []byte) []byte {
	b = appendString32(b, q.Export)
	b = be.AppendUint32(b, uint32(len(q.Queries)))
	for _, s := range q.Queries {
		b = appendString32(b, s)
	}
	return b
}

// ParseMetaContextRequest decodes the data of the metadata context
// options.
func ParseMetaContextRequest(data []byte) (MetaContextRequest, error) {
	name, rest, err := takeString32(data, "export name")
	if err != nil {
		return MetaContextRequest{}, err
	}
	if len(rest) < 4 {
		return MetaContextRequest{}, protoErrorf("metadata context request without query count")
	}
	n := be.Uint32(rest)
	rest = rest[4:]
	// Each query takes at least its 4-byte length: bound n by the data
	// before allocating anything for it.
	if uint64(n)*4 > uint64(len(rest)) {
		return MetaContextRequest{}, protoErrorf("metadata context request claims %d queries in %d bytes", n, len(rest))
	}
	q := MetaContextRequest{Export: name}
	for i := uint32(0); i < n; i++ {
		var s string
		if s, rest, err = takeString32(rest, "metadata context query"); err != nil {
			return MetaContextRequest{}, err
		}
		q.Queries = append(q.Queries, s)
	}
	if len(rest) != 0 {
		return MetaContextRequest{}, protoErrorf("metadata context request has %d trailing bytes", len(rest))
	}
	return q, nil
}

// appendString32 appends s with its 32-bit length prefix, as
// takeString32 reads it.
func appendString32(b []byte, s string) []byte {
	b = be.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// takeString32 splits a string with a 32-bit length prefix off b.
func takeString32(b []byte, what string) (string, []byte, error) {
	if len(b) < 4 {
		return "", nil, protoErrorf("%s: length cut short", what)
	}
	n := be.Uint32(b)
	b = b[4:]
	if uint64(n) > uint64(len(b)) {
		return "", nil, protoErrorf("%s: %d bytes claimed, %d present", what, n, len(b))
	}
	if n > MaxString {
		return "", nil, protoErrorf("%s: %d bytes, limit %d", what, n, MaxString)
	}
	s := string(b[:n])
	if err := checkString(s, what); err != nil {
		return "", nil, err
	}
	return s, b[n:], nil
}

// checkString enforces the protocol's rules for strings: UTF-8, no NUL.
func checkString(s, what string) error {
	if !utf8.ValidString(s) {
		return protoErrorf("%s is not UTF-8", what)
	}
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return protoErrorf("%s contains NUL", what)
		}
	}
	return nil
}

// Info is one NBD_REP_INFO item. Which fields are set depends on Type:
// Size and Flags for InfoExport; the three block sizes for InfoBlockSize;
// Text for InfoName and InfoDescription. Other types are kept by Type
// alone, for the client to ignore.
type Info struct {
	Type      InfoType
	Size      uint64
	Flags     TransmissionFlags
	MinBlock  uint32
	PrefBlock uint32
	MaxBlock  uint32
	Text      string
}

// Append appends the wire form of i (the NBD_REP_INFO data) to b.
func (i Info) Append(b []byte) []byte {
	b = be.AppendUint16(b, uint16(i.Type))
	switch i.Type {
	case InfoExport:
		b = be.AppendUint64(b, i.Size)
		b = be.AppendUint16(b, uint16(i.Flags))
	case InfoBlockSize:
		b = be.AppendUint32(b, i.MinBlock)
		b = be.AppendUint32(b, i.PrefBlock)
		b = be.AppendUint32(b, i.MaxBlock)
	case InfoName, InfoDescription:
		b = append(b, i.Text...)
	}
	return b
}

// ParseInfo decodes the data of an NBD_REP_INFO reply.
func ParseInfo(data []byte) (Info, error) {
	if len(data) < 2 {
		return Info{}, protoErrorf("NBD_REP_INFO of %d bytes", len(data))
	}
	i := Info{Type: InfoType(be.Uint16(data))}
	p := data[2:]
	switch i.Type {
	case InfoExport:
		if len(p) != 10 {
			return i, protoErrorf("NBD_INFO_EXPORT of %d bytes, want 12", len(data))
		}
		i.Size, i.Flags = be.Uint64(p), TransmissionFlags(be.Uint16(p[8:]))
	case InfoBlockSize:
		if len(p) != 12 {
			return i, protoErrorf("NBD_INFO_BLOCK_SIZE of %d bytes, want 14", len(data))
		}
		i.MinBlock, i.PrefBlock, i.MaxBlock = be.Uint32(p), be.Uint32(p[4:]), be.Uint32(p[8:])
	case InfoName, InfoDescription:
		if len(p) > MaxString {
			return i, protoErrorf("information string of %d bytes", len(p))
		}
		if err := checkString(string(p), "information string"); err != nil {
			return i, err
		}
		i.Text = string(p)
	}
	return i, nil
}

// AppendServerReply appends the data of an NBD_REP_SERVER reply.
func AppendServerReply(b []byte, name, description string) []byte {
	b = appendString32(b, name)
	return append(b, description...)
}

// ParseServerReply decodes the data of an NBD_REP_SERVER reply.
func ParseServerReply(data []byte) (name, description string, err error) {
	name, rest, err := takeString32(data, "export name")
	if err != nil {
		return "", "", err
	}
	return name, string(rest), nil
}

// AppendMetaContextReply appends the data of an NBD_REP_META_CONTEXT
// reply.
func AppendMetaContextReply(b []byte, id uint32, name string) []byte {
	b = be.AppendUint32(b, id)
	return append(b, name...)
}

// ParseMetaContextReply decodes the data of an NBD_REP_META_CONTEXT
// reply.
func ParseMetaContextReply(data []byte) (id uint32, name string, err error) {
	if len(data) < 4 {
		return 0, "", protoErrorf("NBD_REP_META_CONTEXT of %d bytes", len(data))
	}
	name = string(data[4:])
	if len(name) > MaxString {
		return 0, "", protoErrorf("metadata context name of %d bytes", len(name))
	}
	return be.Uint32(data), name, checkString(name, "metadata context name")
}

// WriteExportNameReply writes the server's answer to NBD_OPT_EXPORT_NAME.
func WriteExportNameReply(w io.Writer, size uint64, flags TransmissionFlags, zeroes bool) error {
	b := make([]byte, 10, 10+exportNameZeroes)
	be.PutUint64(b, size)
	be.PutUint16(b[8:], uint16(flags))
	if zeroes {
		b = b[:10+exportNameZeroes]
	}
	_, err := w.Write(b)
	return err
}

// ReadExportNameReply reads the server's answer to NBD_OPT_EXPORT_NAME.
func ReadExportNameReply(r io.Reader, zeroes bool) (uint64, TransmissionFlags, error) {
	b := make([]byte, 10, 10+exportNameZeroes)
	if zeroes {
		b = b[:10+exportNameZeroes]
	}
	if err := readFull(r, b); err != nil {
		return 0, 0, err
	}
	return be.Uint64(b), TransmissionFlags(be.Uint16(b[8:])), nil
}

// Request is a transmission request header. A write's payload follows it
// on the wire; the codec leaves payloads to the caller.
type Request struct {
	Flags   CmdFlags
	Command Command
	Cookie  uint64
	Offset  uint64
	Length  uint32
}

// AppendRequest appends the wire form of q to b.
func AppendRequest(b []byte, q Request) []byte {
	b = be.AppendUint32(b, magicRequest)
	b = be.AppendUint16(b, uint16(q.Flags))
	b = be.AppendUint16(b, uint16(q.Command))
	b = be.AppendUint64(b, q.Cookie)
	b = be.AppendUint64(b, q.Offset)
	return be.AppendUint32(b, q.Length)
}

// WriteRequest writes a request header.
func WriteRequest(w io.Writer, q Request) error {
	var a [requestSize]byte
	_, err := w.Write(AppendRequest(a[:0], q))
	return err
}

// ReadRequest reads a request header.
func ReadRequest(r io.Reader) (Request, error) {
	var b [requestSize]byte
	if err := readFull(r, b[:]); err != nil {
		return Request{}, err
	}
	return DecodeRequest(b[:])
}

// DecodeRequest decodes a request header from its requestSize bytes.
func DecodeRequest(b []byte) (Request, error) {
	if len(b) != requestSize {
		return Request{}, protoErrorf("request header of %d bytes", len(b))
	}
	if m := be.Uint32(b); m != magicRequest {
		return Request{}, protoErrorf("request magic %#x", m)
	}
	return Request{
		Flags:   CmdFlags(be.Uint16(b[4:])),
		Command: Command(be.Uint16(b[6:])),
		Cookie:  be.Uint64(b[8:]),
		Offset:  be.Uint64(b[16:]),
		Length:  be.Uint32(b[24:]),
	}, nil
}

// ReplyHeader is the header of a simple reply (Structured false: Errno
// and Cookie are set) or of a structured reply chunk (Flags, Type, Cookie
// and Length are set). Payloads follow on the wire: a simple read reply's
// data, a chunk's Length bytes.
type ReplyHeader struct {
	Structured bool
	Errno      Errno
	Flags      ReplyFlags
	Type       ChunkType
	Cookie     uint64
	Length     uint32
}

// Done reports whether h ends its request's reply.
func (h ReplyHeader) Done() bool { return !h.Structured || h.Flags&ReplyFlagDone != 0 }

// AppendSimpleReply appends a simple reply header to b.
func AppendSimpleReply(b []byte, cookie uint64, errno Errno) []byte {
	b = be.AppendUint32(b, magicSimple)
	b = be.AppendUint32(b, uint32(errno))
	return be.AppendUint64(b, cookie)
}

// AppendChunkHeader appends a structured reply chunk header to b.
func AppendChunkHeader(b []byte, flags ReplyFlags, t ChunkType, cookie uint64, length uint32) []byte {
	b = be.AppendUint32(b, magicStructured)
	b = be.AppendUint16(b, uint16(flags))
	b = be.AppendUint16(b, uint16(t))
	b = be.AppendUint64(b, cookie)
	return be.AppendUint32(b, length)
}

// ReadReplyHeader reads the header of a simple reply or structured chunk.
func ReadReplyHeader(r io.Reader) (ReplyHeader, error) {
	var b [structuredReplySize]byte
	if err := readFull(r, b[:4]); err != nil {
		return ReplyHeader{}, err
	}
	switch m := be.Uint32(b[:]); m {
	case magicSimple:
		if err := readFull(r, b[4:simpleReplySize]); err != nil {
			return ReplyHeader{}, unexpected(err)
		}
		return ReplyHeader{Errno: Errno(be.Uint32(b[4:])), Cookie: be.Uint64(b[8:])}, nil
	case magicStructured:
		if err := readFull(r, b[4:structuredReplySize]); err != nil {
			return ReplyHeader{}, unexpected(err)
		}
		return ReplyHeader{
			Structured: true,
			Flags:      ReplyFlags(be.Uint16(b[4:])),
			Type:       ChunkType(be.Uint16(b[6:])),
			Cookie:     be.Uint64(b[8:]),
			Length:     be.Uint32(b[16:]),
		}, nil
	default:
		return ReplyHeader{}, protoErrorf("reply magic %#x", m)
	}
}

// ErrorChunk is the payload of an error chunk. HasOffset marks
// NBD_REPLY_TYPE_ERROR_OFFSET.
type ErrorChunk struct {
	Errno     Errno
	Message   string
	HasOffset bool
	Offset    uint64
}

// Type is the chunk type that carries e.
func (e ErrorChunk) Type() ChunkType {
	if e.HasOffset {
		return ChunkErrorOffset
	}
	return ChunkError
}

// AppendErrorChunk appends the payload of e to b. Messages beyond the
// protocol's string limit are cut.
func AppendErrorChunk(b []byte, e ErrorChunk) []byte {
	msg := e.Message
	if len(msg) > MaxString {
		msg = msg[:MaxString]
	}
	b = be.AppendUint32(b, uint32(e.Errno))
	b = be.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	if e.HasOffset {
		b = be.AppendUint64(b, e.Offset)
	}
	return b
}

// ParseErrorChunk decodes the payload of an error chunk of type t; error
// types this codec does not know decode as NBD_REPLY_TYPE_ERROR, with
// whatever follows the message ignored, as the protocol asks.
func ParseErrorChunk(t ChunkType, p []byte) (ErrorChunk, error) {
	if len(p) < 6 {
		return ErrorChunk{}, protoErrorf("%v payload of %d bytes", t, len(p))
	}
	e := ErrorChunk{Errno: Errno(be.Uint32(p))}
	n := int(be.Uint16(p[4:]))
	rest := p[6:]
	if n > len(rest) {
		return ErrorChunk{}, protoErrorf("%v message of %d bytes in %d", t, n, len(rest))
	}
	e.Message, rest = string(rest[:n]), rest[n:]
	if !utf8.ValidString(e.Message) {
		e.Message = "(message not UTF-8)"
	}
	if e.Errno == 0 {
		return ErrorChunk{}, protoErrorf("%v with error value 0", t)
	}
	if t == ChunkErrorOffset {
		if len(rest) != 8 {
			return ErrorChunk{}, protoErrorf("%v with %d bytes after the message, want 8", t, len(rest))
		}
		e.HasOffset, e.Offset = true, be.Uint64(rest)
	}
	return e, nil
}

// AppendOffsetHole appends the payload of an NBD_REPLY_TYPE_OFFSET_HOLE
// chunk.
func AppendOffsetHole(b []byte, offset uint64, length uint32) []byte {
	b = be.AppendUint64(b, offset)
	return be.AppendUint32(b, length)
}

// ParseOffsetHole decodes the payload of an NBD_REPLY_TYPE_OFFSET_HOLE
// chunk.
func ParseOffsetHole(p []byte) (offset uint64, length uint32, err error) {
	if len(p) != 12 {
		return 0, 0, protoErrorf("NBD_REPLY_TYPE_OFFSET_HOLE payload of %d bytes, want 12", len(p))
	}
	offset, length = be.Uint64(p), be.Uint32(p[8:])
	if length == 0 {
		return 0, 0, protoErrorf("NBD_REPLY_TYPE_OFFSET_HOLE of length 0")
	}
	return offset, length, nil
}

// Extent is one block status descriptor: Length bytes with status Flags
// (for base:allocation, StateHole and StateZero).
type Extent struct {
	Length uint32
	Flags  uint32
}

// AppendBlockStatus appends the payload of an NBD_REPLY_TYPE_BLOCK_STATUS
// chunk.
func AppendBlockStatus(b []byte, contextID uint32, extents []Extent) []byte {
	b = be.AppendUint32(b, contextID)
	for _, e := range extents {
		b = be.AppendUint32(b, e.Length)
		b = be.AppendUint32(b, e.Flags)
	}
	return b
}

// ParseBlockStatus decodes the payload of an NBD_REPLY_TYPE_BLOCK_STATUS
// chunk.
func ParseBlockStatus(p []byte) (contextID uint32, extents []Extent, err error) {
	if len(p) < 12 || (len(p)-4)%8 != 0 {
		return 0, nil, protoErrorf("NBD_REPLY_TYPE_BLOCK_STATUS payload of %d bytes", len(p))
	}
	contextID = be.Uint32(p)
	for q := p[4:]; len(q) > 0; q = q[8:] {
		e := Extent{Length: be.Uint32(q), Flags: be.Uint32(q[4:])}
		if e.Length == 0 {
			return 0, nil, protoErrorf("block status descriptor of length 0")
		}
		extents = append(extents, e)
	}
	return contextID, extents, nil
}

// unexpected turns an EOF in the middle of a frame into
// io.ErrUnexpectedEOF: the peer went away mid-message.
func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
