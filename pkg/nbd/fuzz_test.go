package nbd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Fuzz targets for everything a peer can send us: the server's option
// parsing, the server's request parsing and the client's reply parsing.
// Their seeds (f.Add) run in the normal test suite; fuzz with
//
//	go test -run='^$' -fuzz=FuzzServerOptions -fuzztime=45s ./pkg/nbd/
//
// The backends panic on any request outside the export or unaligned, so
// the server letting one through is a crash, not a quiet corruption.

// fuzzConn is a connection that reads a fixed script and discards what
// is written.
type fuzzConn struct {
	r      io.Reader
	closed atomic.Bool
}

func (c *fuzzConn) Read(p []byte) (int, error) {
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	return c.r.Read(p)
}
func (c *fuzzConn) Write(p []byte) (int, error) {
	if c.closed.Load() {
		return 0, net.ErrClosed
	}
	return len(p), nil
}
func (c *fuzzConn) Close() error                     { c.closed.Store(true); return nil }
func (c *fuzzConn) LocalAddr() net.Addr              { return fuzzAddr{} }
func (c *fuzzConn) RemoteAddr() net.Addr             { return fuzzAddr{} }
func (c *fuzzConn) SetDeadline(time.Time) error      { return nil }
func (c *fuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fuzzConn) SetWriteDeadline(time.Time) error { return nil }

type fuzzAddr struct{}

func (fuzzAddr) Network() string { return "fuzz" }
func (fuzzAddr) String() string  { return "fuzz" }

var (
	fuzzTLSOnce sync.Once
	fuzzTLS     *tls.Config
)

// fuzzServer is a fresh server per input, so that inputs do not depend
// on each other (epochs advance, exports fill).
func fuzzServer(t testing.TB, withTLS bool) *Server {
	cfg := ServerConfig{
		Exports: []Export{
			{Name: "mem", Backend: holeyBackend{newMem(64<<10, 512)}},
			{Name: "ro", Backend: newMem(8192, 4096), ReadOnly: true},
			{Name: "vol", Backend: newMem(64<<10, 512), Epochs: &MemEpochs{}, AllowPlainRead: true},
		},
		Logger:           slog.New(slog.DiscardHandler),
		MaxInFlight:      8,
		MaxInFlightBytes: 1 << 20,
	}
	if withTLS {
		fuzzTLSOnce.Do(func() {
			ca, _ := NewDevCA("fuzz")
			kp, _ := ca.Issue("fuzz", []string{"localhost"}, true)
			cert, err := tls.X509KeyPair(kp.CertPEM, kp.KeyPEM)
			if err != nil {
				panic(err)
			}
			fuzzTLS = &tls.Config{Certificates: []tls.Certificate{cert}}
		})
		cfg.TLS = fuzzTLS
	}
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func serveScript(t testing.TB, withTLS bool, script []byte) {
	s := fuzzServer(t, withTLS)
	done := make(chan struct{})
	go func() {
		s.ServeConn(context.Background(), &fuzzConn{r: bytes.NewReader(script)})
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("server still serving a finished script after 10s")
	}
	s.Close()
}

// Building blocks of scripts.
func clientFlags(f ClientFlags) []byte { return be.AppendUint32(nil, uint32(f)) }

func optBytes(o Option, data []byte) []byte {
	var b bytes.Buffer
	WriteOption(&b, OptionRequest{Option: o, Data: data})
	return b.Bytes()
}

func reqBytes(q Request, payload []byte) []byte { return append(AppendRequest(nil, q), payload...) }

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func FuzzServerOptions(f *testing.F) {
	flags := clientFlags(FlagCFixedNewstyle | FlagCNoZeroes)
	goMem := optBytes(OptGo, ExportRequest{Name: "mem", Infos: []InfoType{InfoBlockSize, InfoName, InfoDescription}}.Append(nil))
	meta := MetaContextRequest{Export: "mem", Queries: []string{MetaBaseAllocation, "base:", "x-other:thing"}}.Append(nil)
	for _, seed := range [][]byte{
		cat(flags, optBytes(OptList, nil), optBytes(OptAbort, nil)),
		cat(flags, optBytes(OptStructuredReply, nil), optBytes(OptSetMetaContext, meta), goMem, reqBytes(Request{Command: CmdDisc}, nil)),
		cat(flags, optBytes(OptListMetaContext, meta), optBytes(OptInfo, ExportRequest{Name: "ro"}.Append(nil))),
		cat(flags, optBytes(OptInfo, ExportRequest{Name: "vol@epoch=3"}.Append(nil)), optBytes(OptGo, ExportRequest{Name: "vol"}.Append(nil))),
		cat(flags, optBytes(OptGo, ExportRequest{Name: "vol@epoch=03"}.Append(nil)), optBytes(OptGo, ExportRequest{Name: "nope"}.Append(nil))),
		cat(flags, optBytes(OptExportName, []byte("mem")), reqBytes(Request{Command: CmdRead, Length: 512}, nil)),
		cat(clientFlags(0), optBytes(OptExportName, []byte("ro"))),
		cat(flags, optBytes(OptStartTLS, nil), []byte("\x16\x03\x01 not a client hello")),
		cat(flags, optBytes(OptStartTLS, []byte{1}), optBytes(OptExtendedHeaders, nil), optBytes(Option(1<<31), []byte("x"))),
		cat(flags, optBytes(OptGo, []byte{0, 0, 0, 200, 'm'})),
		cat(flags, []byte("IHAVEOPT\x00\x00\x00\x07\xff\xff\xff\xff")),
		cat(clientFlags(1<<7), optBytes(OptList, nil)),
	} {
		f.Add(false, seed)
		f.Add(true, seed)
	}
	f.Fuzz(func(t *testing.T, withTLS bool, script []byte) {
		serveScript(t, withTLS, script)
	})
}

func FuzzServerRequests(f *testing.F) {
	w := func(cmd Command, flags CmdFlags, cookie, off uint64, n uint32) []byte {
		var payload []byte
		if cmd == CmdWrite {
			payload = pattern(int(n), byte(cookie))
		}
		return reqBytes(Request{Command: cmd, Flags: flags, Cookie: cookie, Offset: off, Length: n}, payload)
	}
	for _, seed := range [][]byte{
		cat(w(CmdWrite, CmdFlagFUA, 1, 0, 4096), w(CmdRead, 0, 2, 0, 4096), w(CmdFlush, 0, 3, 0, 0), w(CmdDisc, 0, 4, 0, 0)),
		cat(w(CmdWriteZeroes, CmdFlagNoHole, 1, 512, 1024), w(CmdTrim, 0, 2, 0, 512), w(CmdBlockStatus, CmdFlagReqOne, 3, 0, 64<<10)),
		cat(w(CmdRead, CmdFlagDF, 1, 1, 511), w(CmdRead, 0, 2, 64<<10, 512), w(CmdCache, 0, 3, 0, 4096)),
		cat(w(CmdWrite, 0, 1, 1<<40, 512), w(Command(42), 0, 2, 0, 0), w(CmdRead, 0, 3, ^uint64(0)-511, 1024)),
		cat(w(CmdWrite, 0, 1, 0, 512)[:100]),
		reqBytes(Request{Command: CmdWrite, Length: MaxPayload + 1}, nil),
		[]byte("\x25\x60\x95\x13garbage"),
	} {
		for mode := byte(0); mode < 4; mode++ {
			f.Add(mode, seed)
		}
	}
	f.Fuzz(func(t *testing.T, mode byte, tx []byte) {
		// mode picks the negotiation: bit 0 structured replies (and
		// base:allocation), bit 1 a fenced export with an epoch, bit 2
		// the read-only export.
		hs := clientFlags(FlagCFixedNewstyle | FlagCNoZeroes)
		name := "mem"
		switch {
		case mode&4 != 0:
			name = "ro"
		case mode&2 != 0:
			name = "vol@epoch=2"
		}
		if mode&1 != 0 {
			hs = cat(hs, optBytes(OptStructuredReply, nil),
				optBytes(OptSetMetaContext, MetaContextRequest{Export: name, Queries: []string{MetaBaseAllocation}}.Append(nil)))
		}
		hs = cat(hs, optBytes(OptGo, ExportRequest{Name: name}.Append(nil)))
		serveScript(t, false, cat(hs, tx))
	})
}

// FuzzClientReplies feeds arbitrary server bytes to a client connection
// with five requests in flight (cookies 1 to 5): a read of 4096 bytes at
// 8192, a read of 512 at 0, a write, a block status and a flush. Whatever
// arrives, every request must complete, and reads must never write
// outside their buffers.
func FuzzClientReplies(f *testing.F) {
	chunk := func(flags ReplyFlags, t ChunkType, cookie uint64, payload []byte) []byte {
		return append(AppendChunkHeader(nil, flags, t, cookie, uint32(len(payload))), payload...)
	}
	data := func(off uint64, n int) []byte { return append(be.AppendUint64(nil, off), pattern(n, 1)...) }
	done := ReplyFlagDone
	for _, seed := range [][]byte{
		// Structured: all five answered well, out of order.
		cat(AppendSimpleReply(nil, 3, 0), chunk(0, ChunkOffsetData, 1, data(8192, 1024)),
			chunk(done, ChunkBlockStatus, 4, AppendBlockStatus(nil, 1, []Extent{{4096, StateHole}})),
			chunk(0, ChunkOffsetHole, 1, AppendOffsetHole(nil, 8192+1024, 2048)), chunk(done, ChunkOffsetData, 1, data(8192+3072, 1024)),
			chunk(done, ChunkError, 2, AppendErrorChunk(nil, ErrorChunk{Errno: EIO, Message: "bad"})), chunk(done, ChunkNone, 5, nil)),
		// Simple replies, as to a client without structured replies.
		cat(AppendSimpleReply(nil, 2, 0), pattern(512, 2), AppendSimpleReply(nil, 1, 5), AppendSimpleReply(nil, 3, 0), AppendSimpleReply(nil, 5, 0)),
		// Broken servers.
		chunk(done, ChunkOffsetData, 1, data(0, 4096)),
		cat(chunk(0, ChunkOffsetData, 1, data(8192, 2048)), chunk(done, ChunkOffsetData, 1, data(8192+1024, 3072))),
		chunk(done, ChunkOffsetData, 1, data(8192, 1024)),
		chunk(done, ChunkErrorOffset, 2, AppendErrorChunk(nil, ErrorChunk{Errno: 9999, Message: "x", HasOffset: true, Offset: 7})),
		chunk(done, chunkErr|99, 5, []byte{0, 0, 0, 1, 0, 0}),
		chunk(done, ChunkType(77), 5, nil),
		AppendSimpleReply(nil, 99, 0),
		chunk(done, ChunkBlockStatus, 4, []byte{0, 0, 0, 1}),
		[]byte{0x67, 0x44, 0x66},
	} {
		f.Add(true, seed)
		f.Add(false, seed)
	}
	f.Fuzz(func(t *testing.T, structured bool, script []byte) {
		info := ExportInfo{Size: 1 << 20, Flags: FlagHasFlags | FlagSendFlush | FlagSendWriteZeroes, MinBlock: 512,
			PrefBlock: 4096, MaxBlock: MaxPayload, Structured: structured, BlockStatus: structured, metaID: 1}
		nc := &fuzzConn{r: bytes.NewReader(script)}
		c := newConn(nc, nc, bufioReader(nc), info, time.Second, nil)
		ctx := context.Background()
		// Guard bytes around each read buffer catch stray writes.
		const guard = 64
		big := bytes.Repeat([]byte{0xcc}, 4096+2*guard)
		small := bytes.Repeat([]byte{0xcc}, 512+2*guard)
		var calls []*call
		for _, r := range []struct {
			q       Request
			dst     []byte
			payload []byte
		}{
			{Request{Command: CmdRead, Offset: 8192, Length: 4096}, big[guard : guard+4096], nil},
			{Request{Command: CmdRead, Offset: 0, Length: 512}, small[guard : guard+512], nil},
			{Request{Command: CmdWrite, Offset: 0, Length: 512}, nil, make([]byte, 512)},
			{Request{Command: CmdBlockStatus, Offset: 0, Length: 4096}, nil, nil},
			{Request{Command: CmdFlush}, nil, nil},
		} {
			cl, err := c.submit(ctx, r.q, r.payload, r.dst)
			if err != nil {
				t.Fatalf("submit: %v", err)
			}
			calls = append(calls, cl)
		}
		c.readLoop() // returns once the script is consumed or rejected
		for i, cl := range calls {
			select {
			case <-cl.done:
			default:
				t.Fatalf("request %d never completed", i+1)
			}
		}
		for _, b := range [][]byte{big[:guard], big[guard+4096:], small[:guard], small[guard+512:]} {
			if !bytes.Equal(b, bytes.Repeat([]byte{0xcc}, guard)) {
				t.Fatal("a reply was written outside its read buffer")
			}
		}
		if err := calls[0].result; err == nil && len(calls[0].spans) == 0 && structured {
			t.Fatal("structured read succeeded without content")
		}
	})
}

func bufioReader(r io.Reader) *bufio.Reader { return bufio.NewReaderSize(r, 64<<10) }
