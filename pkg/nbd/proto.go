package nbd

import (
	"fmt"
	"strings"
)

// Wire constants of the NBD protocol (fixed newstyle), as numbered by the
// protocol document (NetworkBlockDevice/nbd doc/proto.md) and spelled
// there with an NBD_ prefix. Everything is big-endian on the wire.

// Magic numbers.
const (
	magicInit       uint64 = 0x4e42444d41474943 // "NBDMAGIC", first 8 bytes from the server
	magicOpt        uint64 = 0x49484156454f5054 // "IHAVEOPT", newstyle greeting and every option request
	magicOptReply   uint64 = 0x0003e889045565a9 // every option reply
	magicRequest    uint32 = 0x25609513         // transmission request
	magicSimple     uint32 = 0x67446698         // simple reply
	magicStructured uint32 = 0x668e33ef         // structured reply chunk
)

// Fixed sizes of wire headers.
const (
	greetingSize        = 8 + 8 + 2
	optionHeaderSize    = 8 + 4 + 4
	optionReplyHdrSize  = 8 + 4 + 4 + 4
	requestSize         = 4 + 2 + 2 + 8 + 8 + 4
	simpleReplySize     = 4 + 4 + 8
	structuredReplySize = 4 + 2 + 2 + 8 + 4
	exportNameZeroes    = 124
)

// MaxString is the protocol's limit on strings (export names, messages).
const MaxString = 4096

// HandshakeFlags are sent by the server after the greeting magic.
type HandshakeFlags uint16

const (
	FlagFixedNewstyle HandshakeFlags = 1 << 0
	FlagNoZeroes      HandshakeFlags = 1 << 1
)

// ClientFlags answer the handshake flags.
type ClientFlags uint32

const (
	FlagCFixedNewstyle ClientFlags = 1 << 0
	FlagCNoZeroes      ClientFlags = 1 << 1
)

// Option is an option request code.
type Option uint32

const (
	OptExportName      Option = 1
	OptAbort           Option = 2
	OptList            Option = 3
	OptStartTLS        Option = 5
	OptInfo            Option = 6
	OptGo              Option = 7
	OptStructuredReply Option = 8
	OptListMetaContext Option = 9
	OptSetMetaContext  Option = 10
	OptExtendedHeaders Option = 11
)

var optionNames = [...]string{
	OptExportName:      "EXPORT_NAME",
	OptAbort:           "ABORT",
	OptList:            "LIST",
	4:                  "PEEK_EXPORT",
	OptStartTLS:        "STARTTLS",
	OptInfo:            "INFO",
	OptGo:              "GO",
	OptStructuredReply: "STRUCTURED_REPLY",
	OptListMetaContext: "LIST_META_CONTEXT",
	OptSetMetaContext:  "SET_META_CONTEXT",
	OptExtendedHeaders: "EXTENDED_HEADERS",
}

func (o Option) String() string {
	if int(o) < len(optionNames) && optionNames[o] != "" {
		return "NBD_OPT_" + optionNames[o]
	}
	return fmt.Sprintf("NBD_OPT_%d", uint32(o))
}

// ReplyType is the type of an option reply. Errors have bit 31 set.
type ReplyType uint32

const repErr ReplyType = 1 << 31

const (
	RepAck           ReplyType = 1
	RepServer        ReplyType = 2
	RepInfo          ReplyType = 3
	RepMetaContext   ReplyType = 4
	RepErrUnsup      ReplyType = repErr | 1
	RepErrPolicy     ReplyType = repErr | 2
	RepErrInvalid    ReplyType = repErr | 3
	RepErrPlatform   ReplyType = repErr | 4
	RepErrTLSReqd    ReplyType = repErr | 5
	RepErrUnknown    ReplyType = repErr | 6
	RepErrShutdown   ReplyType = repErr | 7
	RepErrBlockSize  ReplyType = repErr | 8
	RepErrTooBig     ReplyType = repErr | 9
	RepErrExtHdrReqd ReplyType = repErr | 10
)

// IsError reports whether t is an error reply.
func (t ReplyType) IsError() bool { return t&repErr != 0 }

var replyTypeNames = map[ReplyType]string{
	RepAck:           "ACK",
	RepServer:        "SERVER",
	RepInfo:          "INFO",
	RepMetaContext:   "META_CONTEXT",
	RepErrUnsup:      "ERR_UNSUP",
	RepErrPolicy:     "ERR_POLICY",
	RepErrInvalid:    "ERR_INVALID",
	RepErrPlatform:   "ERR_PLATFORM",
	RepErrTLSReqd:    "ERR_TLS_REQD",
	RepErrUnknown:    "ERR_UNKNOWN",
	RepErrShutdown:   "ERR_SHUTDOWN",
	RepErrBlockSize:  "ERR_BLOCK_SIZE_REQD",
	RepErrTooBig:     "ERR_TOO_BIG",
	RepErrExtHdrReqd: "ERR_EXT_HEADER_REQD",
}

func (t ReplyType) String() string {
	if n, ok := replyTypeNames[t]; ok {
		return "NBD_REP_" + n
	}
	if t.IsError() {
		return fmt.Sprintf("NBD_REP_ERR(%d)", uint32(t&^repErr))
	}
	return fmt.Sprintf("NBD_REP(%d)", uint32(t))
}

// InfoType names an information item of NBD_OPT_INFO and NBD_OPT_GO.
type InfoType uint16

const (
	InfoExport      InfoType = 0
	InfoName        InfoType = 1
	InfoDescription InfoType = 2
	InfoBlockSize   InfoType = 3
)

// TransmissionFlags describe an export; sent at the end of the handshake.
type TransmissionFlags uint16

const (
	FlagHasFlags        TransmissionFlags = 1 << 0
	FlagReadOnly        TransmissionFlags = 1 << 1
	FlagSendFlush       TransmissionFlags = 1 << 2
	FlagSendFUA         TransmissionFlags = 1 << 3
	FlagRotational      TransmissionFlags = 1 << 4
	FlagSendTrim        TransmissionFlags = 1 << 5
	FlagSendWriteZeroes TransmissionFlags = 1 << 6
	FlagSendDF          TransmissionFlags = 1 << 7
	FlagCanMultiConn    TransmissionFlags = 1 << 8
	FlagSendResize      TransmissionFlags = 1 << 9
	FlagSendCache       TransmissionFlags = 1 << 10
	FlagSendFastZero    TransmissionFlags = 1 << 11
)

var transmissionFlagNames = []string{"HAS_FLAGS", "READ_ONLY", "SEND_FLUSH", "SEND_FUA", "ROTATIONAL",
	"SEND_TRIM", "SEND_WRITE_ZEROES", "SEND_DF", "CAN_MULTI_CONN", "SEND_RESIZE", "SEND_CACHE", "SEND_FAST_ZERO"}

func (f TransmissionFlags) String() string { return flagString(uint64(f), transmissionFlagNames) }

// Command is a transmission request type.
type Command uint16

const (
	CmdRead        Command = 0
	CmdWrite       Command = 1
	CmdDisc        Command = 2
	CmdFlush       Command = 3
	CmdTrim        Command = 4
	CmdCache       Command = 5
	CmdWriteZeroes Command = 6
	CmdBlockStatus Command = 7
)

var commandNames = []string{"READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES", "BLOCK_STATUS"}

func (c Command) String() string {
	if int(c) < len(commandNames) {
		return "NBD_CMD_" + commandNames[c]
	}
	return fmt.Sprintf("NBD_CMD_%d", uint16(c))
}

// CmdFlags modify a request.
type CmdFlags uint16

const (
	CmdFlagFUA      CmdFlags = 1 << 0
	CmdFlagNoHole   CmdFlags = 1 << 1
	CmdFlagDF       CmdFlags = 1 << 2
	CmdFlagReqOne   CmdFlags = 1 << 3
	CmdFlagFastZero CmdFlags = 1 << 4
)

var cmdFlagNames = []string{"FUA", "NO_HOLE", "DF", "REQ_ONE", "FAST_ZERO"}

func (f CmdFlags) String() string { return flagString(uint64(f), cmdFlagNames) }

// ReplyFlags are the flags of a structured reply chunk.
type ReplyFlags uint16

// ReplyFlagDone marks the last chunk of a structured reply.
const ReplyFlagDone ReplyFlags = 1 << 0

// ChunkType is the type of a structured reply chunk. Error chunks have
// bit 15 set.
type ChunkType uint16

const chunkErr ChunkType = 1 << 15

const (
	ChunkNone        ChunkType = 0
	ChunkOffsetData  ChunkType = 1
	ChunkOffsetHole  ChunkType = 2
	ChunkBlockStatus ChunkType = 5
	ChunkError       ChunkType = chunkErr | 1
	ChunkErrorOffset ChunkType = chunkErr | 2
)

// IsError reports whether t is an error chunk type, known or not.
func (t ChunkType) IsError() bool { return t&chunkErr != 0 }

var chunkTypeNames = map[ChunkType]string{
	ChunkNone:        "NONE",
	ChunkOffsetData:  "OFFSET_DATA",
	ChunkOffsetHole:  "OFFSET_HOLE",
	ChunkBlockStatus: "BLOCK_STATUS",
	ChunkError:       "ERROR",
	ChunkErrorOffset: "ERROR_OFFSET",
}

func (t ChunkType) String() string {
	if n, ok := chunkTypeNames[t]; ok {
		return "NBD_REPLY_TYPE_" + n
	}
	return fmt.Sprintf("NBD_REPLY_TYPE_%d", uint16(t))
}

// Block status flags of the base:allocation metadata context.
const (
	StateHole uint32 = 1 << 0
	StateZero uint32 = 1 << 1
)

// MetaBaseAllocation is the one metadata context the protocol defines.
const MetaBaseAllocation = "base:allocation"

func flagString(v uint64, names []string) string {
	var parts []string
	for i, n := range names {
		if v&(1<<i) != 0 {
			parts = append(parts, n)
			v &^= 1 << i
		}
	}
	if v != 0 {
		parts = append(parts, fmt.Sprintf("%#x", v))
	}
	if len(parts) == 0 {
		return "0"
	}
	return strings.Join(parts, "|")
}
