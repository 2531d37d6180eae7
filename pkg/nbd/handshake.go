package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
)

// The client's side of the handshake: fixed newstyle, STARTTLS first
// when configured, structured replies, base:allocation, then NBD_OPT_GO
// (NBD_OPT_EXPORT_NAME for servers without it).

// maxOptionReply bounds option reply data the client takes into memory.
const maxOptionReply = 64 << 10

func handshake(ctx context.Context, raw net.Conn, cfg Config) (net.Conn, *bufio.Reader, ExportInfo, error) {
	var info ExportInfo
	nc := net.Conn(raw)
	br := bufio.NewReaderSize(raw, 64<<10)
	bw := bufio.NewWriterSize(raw, 64<<10)
	fail := func(format string, args ...any) (net.Conn, *bufio.Reader, ExportInfo, error) {
		return nil, nil, info, fmt.Errorf(format, args...)
	}

	hf, err := ReadGreeting(br)
	if err != nil {
		return fail("handshake: %w", unexpected(err))
	}
	if hf&FlagFixedNewstyle == 0 {
		return fail("handshake: server does not speak fixed newstyle NBD")
	}
	cf := FlagCFixedNewstyle
	if hf&FlagNoZeroes != 0 {
		cf |= FlagCNoZeroes
	}
	if err := WriteClientFlags(bw, cf); err != nil {
		return fail("handshake: %w", err)
	}

	// option sends one option and reads its replies up to the final one,
	// handing each non-final reply to each.
	option := func(o Option, data []byte, each func(OptionReply) error) (ReplyType, string, error) {
		if err := WriteOption(bw, OptionRequest{Option: o, Data: data}); err != nil {
			return 0, "", err
		}
		if err := bw.Flush(); err != nil {
			return 0, "", err
		}
		for {
			rep, err := ReadOptionReply(br, maxOptionReply)
			if err != nil {
				return 0, "", unexpected(err)
			}
			if rep.Option != o {
				return 0, "", protoErrorf("reply %v to %v while %v was pending", rep.Type, rep.Option, o)
			}
			if rep.Type == RepAck || rep.Type.IsError() {
				msg := strings.ToValidUTF8(string(rep.Data), "?")
				return rep.Type, msg, nil
			}
			if each == nil {
				return 0, "", protoErrorf("unexpected %v to %v", rep.Type, o)
			}
			if err := each(rep); err != nil {
				return 0, "", err
			}
		}
	}

	if cfg.TLS != nil {
		t, msg, err := option(OptStartTLS, nil, nil)
		if err != nil {
			return fail("STARTTLS: %w", err)
		}
		if t != RepAck {
			// A client that wants TLS never continues in clear text
			// (the protocol's defence against downgrade attacks).
			return fail("server refused TLS: %w", &OptionError{Option: OptStartTLS, Reply: t, Message: msg})
		}
		tcfg := cfg.TLS.Clone()
		if tcfg.ServerName == "" && !tcfg.InsecureSkipVerify {
			host, _, err := net.SplitHostPort(cfg.Addr)
			if cfg.Network == "unix" || err != nil {
				return fail("TLS over %s %s: set TLS.ServerName to the name in the server's certificate", cfg.Network, cfg.Addr)
			}
			tcfg.ServerName = host
		}
		tc := tls.Client(raw, tcfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			return fail("TLS handshake: %w", err)
		}
		nc = tc
		br.Reset(tc)
		bw.Reset(tc)
	}

	wire := ExportName(cfg.Export, cfg.Epoch)
	refused := func(o Option, t ReplyType, msg string) error {
		err := &OptionError{Option: o, Reply: t, Message: msg}
		switch {
		case t == RepErrPolicy && strings.HasPrefix(msg, fencedPrefix):
			return fmt.Errorf("%w: %w", ErrFenced, err)
		case t == RepErrTLSReqd:
			return fmt.Errorf("server requires TLS: %w", err)
		}
		return err
	}

	t, msg, err := option(OptStructuredReply, nil, nil)
	switch {
	case err != nil:
		return fail("structured replies: %w", err)
	case t == RepAck:
		info.Structured = true
	case t == RepErrTLSReqd:
		return fail("%w", refused(OptStructuredReply, t, msg))
	}

	if info.Structured {
		// Negotiated before GO so that resync can skip holes; a server
		// without it is fine.
		q := MetaContextRequest{Export: wire, Queries: []string{MetaBaseAllocation}}
		var id uint32
		var found bool
		t, _, err := option(OptSetMetaContext, q.Append(nil), func(rep OptionReply) error {
			if rep.Type != RepMetaContext {
				return protoErrorf("unexpected %v to %v", rep.Type, OptSetMetaContext)
			}
			cid, name, err := ParseMetaContextReply(rep.Data)
			if err == nil && name == MetaBaseAllocation {
				id, found = cid, true
			}
			return err
		})
		if err != nil {
			return fail("metadata contexts: %w", err)
		}
		info.BlockStatus, info.metaID = t == RepAck && found, id
	}

	var sawExport bool
	req := ExportRequest{Name: wire, Infos: []InfoType{InfoBlockSize}}
	t, msg, err = option(OptGo, req.Append(nil), func(rep OptionReply) error {
		if rep.Type != RepInfo {
			return protoErrorf("unexpected %v to %v", rep.Type, OptGo)
		}
		i, err := ParseInfo(rep.Data)
		if err != nil {
			return err
		}
		switch i.Type {
		case InfoExport:
			sawExport = true
			if i.Size > 1<<62 {
				return protoErrorf("export size %d", i.Size)
			}
			info.Size, info.Flags = int64(i.Size), i.Flags
		case InfoBlockSize:
			info.MinBlock, info.PrefBlock, info.MaxBlock = i.MinBlock, i.PrefBlock, i.MaxBlock
		}
		return nil
	})
	switch {
	case err != nil:
		return fail("%v: %w", OptGo, err)
	case t == RepErrUnsup:
		// An old server: the name is all it takes, and a refusal is a
		// closed connection.
		if err := WriteOption(bw, OptionRequest{Option: OptExportName, Data: []byte(wire)}); err != nil {
			return fail("%v: %w", OptExportName, err)
		}
		if err := bw.Flush(); err != nil {
			return fail("%v: %w", OptExportName, err)
		}
		size, flags, err := ReadExportNameReply(br, cf&FlagCNoZeroes == 0)
		if err != nil {
			return fail("%v %q (refused?): %w", OptExportName, wire, unexpected(err))
		}
		if size > 1<<62 {
			return fail("%v: %w", OptExportName, protoErrorf("export size %d", size))
		}
		info.Size, info.Flags = int64(size), flags
	case t != RepAck:
		return fail("%w", refused(OptGo, t, msg))
	case !sawExport:
		return fail("%v: %w", OptGo, protoErrorf("success without NBD_INFO_EXPORT"))
	}
	if err := info.settle(); err != nil {
		return fail("%w", err)
	}
	return nc, br, info, nil
}

// settle checks the block size constraints and fills in defaults.
func (i *ExportInfo) settle() error {
	if i.MinBlock == 0 {
		// No constraint: the protocol's default is 1, but 512 is what a
		// client "desiring maximum interoperability" uses, and what our
		// engine sends anyway.
		i.MinBlock, i.PrefBlock, i.MaxBlock = 1, 4096, MaxPayload
	}
	if i.MinBlock&(i.MinBlock-1) != 0 || i.MinBlock > 64<<10 {
		return protoErrorf("minimum block size %d is not a power of 2 up to 64 KiB", i.MinBlock)
	}
	if i.MaxBlock < i.MinBlock {
		return protoErrorf("maximum block size %d below the minimum %d", i.MaxBlock, i.MinBlock)
	}
	i.MaxBlock = min(i.MaxBlock, MaxPayload) / i.MinBlock * i.MinBlock
	if i.Size%int64(i.MinBlock) != 0 {
		return protoErrorf("export size %d is not a multiple of the block size %d", i.Size, i.MinBlock)
	}
	if i.Flags&FlagHasFlags == 0 {
		i.Flags = FlagHasFlags // no flag is valid without it
	}
	return nil
}

// IsFenced reports whether err says that a newer epoch holds the export.
func IsFenced(err error) bool { return errors.Is(err, ErrFenced) }
