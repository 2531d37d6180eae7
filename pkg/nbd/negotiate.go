package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sort"
	"time"
)

var errAborted = errors.New("client aborted the handshake")

func (c *serverConn) handshake(ctx context.Context) error {
	c.raw.SetDeadline(time.Now().Add(c.srv.cfg.HandshakeTimeout))
	if err := WriteGreeting(c.bw, FlagFixedNewstyle|FlagNoZeroes); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	cf, err := ReadClientFlags(c.br)
	if err != nil {
		return fmt.Errorf("read client flags: %w", err)
	}
	if cf&^(FlagCFixedNewstyle|FlagCNoZeroes) != 0 {
		return protoErrorf("unknown client flags %#x", uint32(cf))
	}
	if c.srv.cfg.TLS != nil && cf&FlagCFixedNewstyle == 0 {
		// TLS needs fixed newstyle; such a client can never get in.
		return protoErrorf("client without fixed newstyle, but TLS is required")
	}
	c.noZeroes = cf&FlagCNoZeroes != 0
	for n := 0; ; n++ {
		if n == maxOptions {
			return protoErrorf("more than %d options", maxOptions)
		}
		o, err := ReadOption(c.br, maxOptionData)
		if err != nil {
			return fmt.Errorf("read option: %w", unexpected(err))
		}
		done, err := c.option(ctx, o)
		if err != nil {
			return fmt.Errorf("%v: %w", o.Option, err)
		}
		if err := c.bw.Flush(); err != nil {
			return err
		}
		if done {
			return nil
		}
	}
}

func (c *serverConn) reply(o Option, t ReplyType, data []byte) error {
	return WriteOptionReply(c.bw, OptionReply{Option: o, Type: t, Data: data})
}

func (c *serverConn) replyErr(o Option, t ReplyType, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if len(msg) > MaxString {
		msg = msg[:MaxString]
	}
	return c.reply(o, t, []byte(msg))
}

// option handles one option; done means transmission begins.
func (c *serverConn) option(ctx context.Context, o OptionRequest) (done bool, err error) {
	if c.stopping.Load() && o.Option != OptAbort {
		return false, c.replyErr(o.Option, RepErrShutdown, "server is shutting down")
	}
	if c.srv.cfg.TLS != nil && !c.tls {
		switch o.Option {
		case OptStartTLS, OptAbort:
		case OptExportName:
			return false, protoErrorf("NBD_OPT_EXPORT_NAME before TLS, which is required")
		default:
			return false, c.replyErr(o.Option, RepErrTLSReqd, "TLS is required: send NBD_OPT_STARTTLS first")
		}
	}
	switch o.Option {
	case OptAbort:
		c.reply(o.Option, RepAck, nil)
		c.bw.Flush()
		return false, errAborted

	case OptList:
		if len(o.Data) != 0 {
			return false, c.replyErr(o.Option, RepErrInvalid, "NBD_OPT_LIST takes no data")
		}
		s := c.srv
		s.mu.Lock()
		names := make([]string, 0, len(s.exports))
		for n := range s.exports {
			names = append(names, n)
		}
		s.mu.Unlock()
		sort.Strings(names)
		for _, n := range names {
			if x := s.lookup(n); x != nil {
				if err := c.reply(o.Option, RepServer, AppendServerReply(nil, n, x.Description)); err != nil {
					return false, err
				}
			}
		}
		return false, c.reply(o.Option, RepAck, nil)

	case OptStartTLS:
		switch {
		case c.srv.cfg.TLS == nil:
			return false, c.replyErr(o.Option, RepErrPolicy, "TLS is not configured on this server")
		case c.tls:
			return false, c.replyErr(o.Option, RepErrInvalid, "TLS is already running")
		case len(o.Data) != 0:
			return false, c.replyErr(o.Option, RepErrInvalid, "NBD_OPT_STARTTLS takes no data")
		}
		if err := c.reply(o.Option, RepAck, nil); err != nil {
			return false, err
		}
		if err := c.bw.Flush(); err != nil {
			return false, err
		}
		if c.br.Buffered() > 0 {
			// Plain bytes after STARTTLS would be read as TLS records by
			// nobody: the client did not wait for our ACK.
			return false, protoErrorf("data after NBD_OPT_STARTTLS before the TLS handshake")
		}
		tc := tls.Server(c.raw, c.srv.cfg.TLS)
		if err := tc.HandshakeContext(ctx); err != nil {
			return false, fmt.Errorf("TLS handshake: %w", err)
		}
		c.nc, c.tls = tc, true
		c.br.Reset(tc)
		c.bw.Reset(tc)
		// The protocol forbids keeping state negotiated in clear text.
		c.structured, c.metaExport, c.metaAlloc = false, "", false
		c.log = c.log.With("tls", true)
		return false, nil

	case OptStructuredReply:
		if len(o.Data) != 0 {
			return false, c.replyErr(o.Option, RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		return false, c.reply(o.Option, RepAck, nil)

	case OptListMetaContext, OptSetMetaContext:
		return false, c.metaContext(o)

	case OptInfo, OptGo:
		q, err := ParseExportRequest(o.Data)
		if err != nil {
			return false, c.replyErr(o.Option, RepErrInvalid, "%v", err)
		}
		return c.infoGo(o.Option, q)

	case OptExportName:
		// No error can be sent: refusing means closing.
		if err := checkString(string(o.Data), "export name"); err != nil {
			return false, err
		}
		x, epoch, ro, _, msg := c.resolve(string(o.Data))
		if x == nil {
			return false, fmt.Errorf("export %q refused: %s", o.Data, msg)
		}
		if !c.attach(x, epoch, ro) {
			return false, fmt.Errorf("export %q refused: %s", o.Data, fencedMessage(epoch, x))
		}
		return true, WriteExportNameReply(c.bw, uint64(x.size), c.flags, !c.noZeroes)

	default:
		return false, c.replyErr(o.Option, RepErrUnsup, "%v is not supported", o.Option)
	}
}

// resolve finds the export a wire name opens and the access it grants.
// On refusal x is nil and rep, msg say why.
func (c *serverConn) resolve(wire string) (x *export, epoch uint64, readOnly bool, rep ReplyType, msg string) {
	name, epoch, err := SplitExportName(wire)
	if err != nil {
		return nil, 0, false, RepErrInvalid, err.Error()
	}
	if x = c.srv.lookup(name); x == nil {
		return nil, 0, false, RepErrUnknown, fmt.Sprintf("no export %q", name)
	}
	readOnly = x.ReadOnly
	switch {
	case x.Epochs == nil && epoch != 0:
		// A client asking for fencing must get it or nothing.
		return nil, 0, false, RepErrPolicy, fmt.Sprintf("export %q is not fenced; it cannot honour an epoch", name)
	case x.Epochs != nil && epoch == 0:
		if !x.AllowPlainRead {
			return nil, 0, false, RepErrPolicy, fmt.Sprintf("export %q is fenced: open it as %q", name, name+epochSep+"N")
		}
		readOnly = true
	case x.Epochs != nil && epoch < x.epoch.Load():
		return nil, 0, false, RepErrPolicy, fencedMessage(epoch, x)
	}
	return x, epoch, readOnly, 0, ""
}

func transmissionFlags(structured, readOnly bool) TransmissionFlags {
	// Every connection shares the backend and Flush reaches the disk, so
	// a flush on one connection covers writes completed on any: that is
	// what CAN_MULTI_CONN promises.
	f := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn
	if structured {
		f |= FlagSendDF // reads are always one chunk
	}
	if readOnly {
		f |= FlagReadOnly
	}
	return f
}

func (c *serverConn) infoGo(opt Option, q ExportRequest) (bool, error) {
	x, epoch, ro, rep, msg := c.resolve(q.Name)
	if x == nil {
		return false, c.replyErr(opt, rep, "%s", msg)
	}
	flags := transmissionFlags(c.structured, ro)
	if opt == OptGo && !c.attach(x, epoch, ro) {
		return false, c.replyErr(opt, RepErrPolicy, "%s", fencedMessage(epoch, x))
	}
	infos := []Info{
		{Type: InfoExport, Size: uint64(x.size), Flags: flags},
		// Sent whether asked or not (the protocol allows it), so that
		// clients learn the alignment a direct-I/O backend needs.
		{Type: InfoBlockSize, MinBlock: x.minBlock, PrefBlock: max(4096, x.minBlock), MaxBlock: MaxPayload},
	}
	for _, t := range q.Infos {
		switch t {
		case InfoName:
			infos = append(infos, Info{Type: InfoName, Text: x.Name})
		case InfoDescription:
			if x.Description != "" {
				infos = append(infos, Info{Type: InfoDescription, Text: x.Description})
			}
		}
	}
	for _, i := range infos {
		if err := c.reply(opt, RepInfo, i.Append(nil)); err != nil {
			return false, err
		}
	}
	if err := c.reply(opt, RepAck, nil); err != nil {
		return false, err
	}
	if opt == OptGo && c.exp.Name != c.metaExport {
		c.metaAlloc = false // contexts were chosen for another export
	}
	return opt == OptGo, nil
}

// metaContextID is the id of base:allocation, the only context we have.
const metaContextID = 1

func (c *serverConn) metaContext(o OptionRequest) error {
	set := o.Option == OptSetMetaContext
	if set {
		c.metaExport, c.metaAlloc = "", false // replaced even on failure
	}
	if !c.structured {
		return c.replyErr(o.Option, RepErrInvalid, "negotiate NBD_OPT_STRUCTURED_REPLY first")
	}
	q, err := ParseMetaContextRequest(o.Data)
	if err != nil {
		return c.replyErr(o.Option, RepErrInvalid, "%v", err)
	}
	name, _, err := SplitExportName(q.Export)
	if err != nil {
		return c.replyErr(o.Option, RepErrInvalid, "%v", err)
	}
	if c.srv.lookup(name) == nil {
		return c.replyErr(o.Option, RepErrUnknown, "no export %q", name)
	}
	match := !set && len(q.Queries) == 0 // listing everything
	for _, s := range q.Queries {
		if s == MetaBaseAllocation || (!set && s == "base:") {
			match = true
		}
	}
	if match {
		id := uint32(0) // reserved in list replies
		if set {
			id = metaContextID
			c.metaExport, c.metaAlloc = name, true
		}
		if err := c.reply(o.Option, RepMetaContext, AppendMetaContextReply(nil, id, MetaBaseAllocation)); err != nil {
			return err
		}
	}
	return c.reply(o.Option, RepAck, nil)
}
