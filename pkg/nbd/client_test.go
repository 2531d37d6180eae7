package nbd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// TestClientAgainstServerModel drives many goroutines of random reads,
// writes, discards, write-zeroes and flushes through one client and
// checks every read against a model of the export. Goroutines own
// disjoint slices of the export, so the model is exact while requests
// are pipelined and answered out of order.
func TestClientAgainstServerModel(t *testing.T) {
	checkNoGoroutines(t)
	const size, block, workers = 4 << 20, 512, 16
	m := newMem(size, block)
	ts := memServer(t, "unix", m)
	c := dial(t, ts, Config{Export: "mem"})
	if c.Size() != size || c.BlockSize() != block {
		t.Fatalf("size %d block %d", c.Size(), c.BlockSize())
	}
	if i := c.Info(); !i.Structured || !i.BlockStatus || i.MaxBlock != MaxPayload || i.Flags&FlagSendWriteZeroes == 0 {
		t.Fatalf("negotiated %+v", i)
	}
	wl := &workload{c: c, model: make([]byte, size), block: block, maxBlocks: 64,
		kinds: []opKind{opWrite, opWrite, opDiscard, opZeroes, opFlush, opRead}}
	for _, err := range wl.run(context.Background(), 1, 0, workers-1, size/workers, func(i int) bool { return i < 200 }) {
		t.Fatal(err)
	}
	if !bytes.Equal(m.snapshot(), wl.model) {
		t.Fatal("export differs from the model")
	}
}

func TestClientRefusesBadRequestsLocally(t *testing.T) {
	m := newMem(1<<20, 4096)
	ts := memServer(t, "unix", m)
	c := dial(t, ts, Config{Export: "mem"})
	ctx := context.Background()
	for _, err := range []error{
		c.ReadAt(ctx, make([]byte, 512), 0),
		c.WriteAt(ctx, make([]byte, 4096), 512),
		c.WriteAt(ctx, make([]byte, 4096), 1<<20),
		c.Discard(ctx, -4096, 4096),
		c.WriteZeroes(ctx, 0, 2<<20),
	} {
		if err == nil {
			t.Error("bad request accepted")
		}
	}
	if n := m.count("read") + m.count("write") + m.count("discard") + m.count("zero"); n != 0 {
		t.Fatalf("%d bad requests reached the backend", n)
	}
}

func TestClientSplitsLargeRequests(t *testing.T) {
	const size = 40 << 20
	m := newMem(size, 512)
	var mu sync.Mutex
	var largest int64
	m.before = func(op string, off, length int64) error {
		mu.Lock()
		largest = max(largest, length)
		mu.Unlock()
		return nil
	}
	ts := memServer(t, "unix", m)
	c := dial(t, ts, Config{Export: "mem"})
	ctx := context.Background()
	p := pattern(size-4096, 9)
	if err := c.WriteAt(ctx, p, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if err := c.ReadAt(ctx, got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, p) {
		t.Fatal("large read differs from large write")
	}
	if err := c.WriteZeroes(ctx, 0, size); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m.snapshot(), make([]byte, size)) {
		t.Fatal("large write-zeroes left data")
	}
	if largest > MaxPayload {
		t.Fatalf("a request of %d bytes reached the server", largest)
	}
}

func TestClientTimeoutKeepsConnection(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	copy(m.data, pattern(1<<20, 5))
	slow := make(chan struct{})
	m.stall("read", 0, 0, func() { <-slow })
	ts := memServer(t, "unix", m)
	c := dial(t, ts, Config{Export: "mem", Timeout: 100 * time.Millisecond})
	ctx := context.Background()

	buf := bytes.Repeat([]byte{0xaa}, 4096)
	err := c.ReadAt(ctx, buf, 0)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow read: %v, want a timeout", err)
	}
	// Cancellation, likewise, fails only its own request.
	cctx, cancel := context.WithCancel(ctx)
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	buf2 := bytes.Repeat([]byte{0xbb}, 4096)
	if err := c.ReadAt(cctx, buf2, 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled read: %v", err)
	}
	// Other requests go on over the same connection meanwhile.
	got := make([]byte, 4096)
	if err := c.ReadAt(ctx, got, 8192); err != nil || !bytes.Equal(got, m.snapshot()[8192:8192+4096]) {
		t.Fatalf("read after a timeout: %v", err)
	}
	if s, _ := c.State(); s != Connected {
		t.Fatalf("state %v after a timeout", s)
	}
	// The late replies arrive and are dropped: the callers' buffers,
	// returned to them, stay as they were.
	close(slow)
	time.Sleep(100 * time.Millisecond)
	if !bytes.Equal(buf, bytes.Repeat([]byte{0xaa}, 4096)) || !bytes.Equal(buf2, bytes.Repeat([]byte{0xbb}, 4096)) {
		t.Fatal("a late reply wrote into the buffer of a request that had timed out")
	}
	if err := c.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, m.snapshot()[:4096]) {
		t.Fatalf("read after late replies: %v", err)
	}
}

func TestClientBlockStatus(t *testing.T) {
	m := newMem(1<<20, 4096)
	ts := startServer(t, "unix", ServerConfig{Exports: []Export{{Name: "holey", Backend: holeyBackend{m}}}})
	c := dial(t, ts, Config{Export: "holey"})
	ctx := context.Background()
	if err := c.WriteAt(ctx, pattern(8192, 1), 64<<10); err != nil {
		t.Fatal(err)
	}
	ext, err := c.BlockStatus(ctx, 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := []Extent{{64 << 10, StateHole | StateZero}, {8192, 0}, {1<<20 - 64<<10 - 8192, StateHole | StateZero}}
	if len(ext) != 3 || ext[0] != want[0] || ext[1] != want[1] || ext[2] != want[2] {
		t.Fatalf("extents %+v, want %+v", ext, want)
	}
}

func TestClientCloseWaitsAndRefuses(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	entered := m.stall("write", -1, 1, func() { time.Sleep(100 * time.Millisecond) })
	ts := memServer(t, "unix", m)
	c := dial(t, ts, Config{Export: "mem"})
	errc := writeInFlight(c, entered)
	c.Close()
	if err := <-errc; err != nil {
		t.Fatalf("write in flight at Close: %v", err)
	}
	if err := c.ReadAt(context.Background(), make([]byte, 512), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after Close: %v", err)
	}
}

// scriptedServer answers the handshake like a server that negotiated
// structured replies, then hands the transmission phase to script.
func scriptedServer(t *testing.T, info ExportInfo, script func(r io.Reader, w io.Writer)) *Client {
	t.Helper()
	return scriptedServers(t, info, time.Hour, script)
}

// scriptedServers is scriptedServer for a client that reconnects: the
// n-th connection (the first is Dial's) runs the n-th script, after
// minBackoff; dialling past the last script fails.
func scriptedServers(t *testing.T, info ExportInfo, minBackoff time.Duration, scripts ...func(r io.Reader, w io.Writer)) *Client {
	t.Helper()
	var mu sync.Mutex
	next := 0
	dialScript := func(context.Context, string, string) (net.Conn, error) {
		mu.Lock()
		defer mu.Unlock()
		if next == len(scripts) {
			return nil, errors.New("no more scripted connections")
		}
		script := scripts[next]
		next++
		cs, ss := net.Pipe()
		go runScript(ss, info, script)
		return cs, nil
	}
	c, err := Dial(context.Background(), Config{
		Export: "x", Logger: testLogger(t), MinBackoff: minBackoff, MaxBackoff: minBackoff, Dial: dialScript,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func runScript(ss net.Conn, info ExportInfo, script func(r io.Reader, w io.Writer)) {
	defer ss.Close()
	WriteGreeting(ss, FlagFixedNewstyle|FlagNoZeroes)
	ReadClientFlags(ss)
	for {
		o, err := ReadOption(ss, 1<<16)
		if err != nil {
			return
		}
		switch o.Option {
		case OptStructuredReply:
			WriteOptionReply(ss, OptionReply{Option: o.Option, Type: RepAck})
		case OptSetMetaContext:
			WriteOptionReply(ss, OptionReply{Option: o.Option, Type: RepMetaContext, Data: AppendMetaContextReply(nil, 7, MetaBaseAllocation)})
			WriteOptionReply(ss, OptionReply{Option: o.Option, Type: RepAck})
		case OptGo:
			WriteOptionReply(ss, OptionReply{Option: o.Option, Type: RepInfo, Data: Info{Type: InfoExport, Size: uint64(info.Size), Flags: info.Flags}.Append(nil)})
			WriteOptionReply(ss, OptionReply{Option: o.Option, Type: RepAck})
			script(ss, ss)
			return
		}
	}
}

func TestClientAssemblesStructuredReads(t *testing.T) {
	data := pattern(4096, 3)
	done := make(chan struct{})
	c := scriptedServer(t, ExportInfo{Size: 1 << 20, Flags: FlagHasFlags | FlagSendFlush}, func(r io.Reader, w io.Writer) {
		q, _ := ReadRequest(r) // read 4096 at 8192
		// Out of order: the tail, a hole in the middle, then the head.
		chunk := func(flags ReplyFlags, t ChunkType, payload []byte) {
			w.Write(append(AppendChunkHeader(nil, flags, t, q.Cookie, uint32(len(payload))), payload...))
		}
		chunk(0, ChunkOffsetData, append(be.AppendUint64(nil, 8192+3072), data[3072:]...))
		chunk(0, ChunkOffsetHole, AppendOffsetHole(nil, 8192+1024, 2048))
		chunk(0, ChunkOffsetData, append(be.AppendUint64(nil, 8192), data[:1024]...))
		chunk(ReplyFlagDone, ChunkNone, nil)
		q, _ = ReadRequest(r) // a read the server fails with a message
		chunk(ReplyFlagDone, ChunkErrorOffset, AppendErrorChunk(nil, ErrorChunk{Errno: EIO, Message: "bad sector", HasOffset: true, Offset: q.Offset}))
		q, _ = ReadRequest(r) // a write, answered with a simple reply
		io.CopyN(io.Discard, r, int64(q.Length))
		w.Write(AppendSimpleReply(nil, q.Cookie, 0))
		q, _ = ReadRequest(r) // overlapping chunks: a broken server
		chunk(0, ChunkOffsetData, append(be.AppendUint64(nil, q.Offset), make([]byte, 1024)...))
		chunk(ReplyFlagDone, ChunkOffsetData, append(be.AppendUint64(nil, q.Offset+512), make([]byte, 512)...))
		close(done)
		io.Copy(io.Discard, r)
	})
	ctx := context.Background()
	got := bytes.Repeat([]byte{0xff}, 4096)
	if err := c.ReadAt(ctx, got, 8192); err != nil {
		t.Fatal(err)
	}
	want := append(append(append([]byte(nil), data[:1024]...), make([]byte, 2048)...), data[3072:]...)
	if !bytes.Equal(got, want) {
		t.Fatal("structured read assembled wrongly")
	}
	err := c.ReadAt(ctx, got, 0)
	var re *RequestError
	if !errors.As(err, &re) || re.Errno != EIO || re.Message != "bad sector" {
		t.Fatalf("error chunk: %v", err)
	}
	if err := c.WriteAt(ctx, make([]byte, 512), 0); err != nil {
		t.Fatalf("simple reply to a write: %v", err)
	}
	err = c.ReadAt(ctx, got[:1024], 0)
	var pe *ProtocolError
	if !errors.Is(err, ErrDisconnected) || !errors.As(err, &pe) && !bytes.Contains([]byte(err.Error()), []byte("overlaps")) {
		t.Fatalf("overlapping chunks: %v, want the connection dropped", err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("script did not run to its end")
	}
}

func TestClientSimpleRepliesAndNoWriteZeroes(t *testing.T) {
	// A server that negotiated nothing: simple replies, no WRITE_ZEROES,
	// no flush. Discard must still leave zeroes, by writing them.
	m := newMem(1<<20, 512)
	copy(m.data, pattern(1<<20, 1))
	c := scriptedPlain(t, m)
	ctx := context.Background()
	if err := c.Discard(ctx, 4096, 8192); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if err := c.ReadAt(ctx, got, 4096); err != nil || !bytes.Equal(got, make([]byte, 8192)) {
		t.Fatalf("discard without WRITE_ZEROES: %v", err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if n := m.count("flush"); n != 0 {
		t.Fatalf("flush sent to a server without SEND_FLUSH")
	}
}

// scriptedPlain serves m with simple replies only and transmission flags
// HAS_FLAGS alone.
func scriptedPlain(t *testing.T, m *memBackend) *Client {
	cs, ss := net.Pipe()
	go func() {
		defer ss.Close()
		WriteGreeting(ss, FlagFixedNewstyle)
		ReadClientFlags(ss)
		for {
			o, err := ReadOption(ss, 1<<16)
			if err != nil {
				return
			}
			if o.Option != OptGo {
				WriteOptionReply(ss, OptionReply{Option: o.Option, Type: RepErrUnsup})
				continue
			}
			WriteOptionReply(ss, OptionReply{Option: o.Option, Type: RepInfo, Data: Info{Type: InfoExport, Size: uint64(m.Size()), Flags: FlagHasFlags}.Append(nil)})
			WriteOptionReply(ss, OptionReply{Option: o.Option, Type: RepAck})
			break
		}
		for {
			q, err := ReadRequest(ss)
			if err != nil || q.Command == CmdDisc {
				return
			}
			switch q.Command {
			case CmdRead:
				p := make([]byte, q.Length)
				m.ReadAt(context.Background(), p, int64(q.Offset))
				ss.Write(append(AppendSimpleReply(nil, q.Cookie, 0), p...))
			case CmdWrite:
				p := make([]byte, q.Length)
				io.ReadFull(ss, p)
				m.WriteAt(context.Background(), p, int64(q.Offset))
				ss.Write(AppendSimpleReply(nil, q.Cookie, 0))
			default:
				ss.Write(AppendSimpleReply(nil, q.Cookie, EINVAL))
			}
		}
	}()
	c, err := Dial(context.Background(), Config{
		Export: "x", Logger: testLogger(t), MinBackoff: time.Hour,
		Dial: func(context.Context, string, string) (net.Conn, error) { return cs, nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if i := c.Info(); i.Structured || i.Flags != FlagHasFlags {
		t.Fatalf("negotiated %+v", i)
	}
	return c
}

// TestClientSoftDisconnectOnShutdown: a write answered with
// NBD_ESHUTDOWN makes the client disconnect softly (NBD_CMD_DISC), as the
// protocol asks, and the write is sent again on the next connection,
// where it succeeds: the server said it is going away, not that the
// write failed.
func TestClientSoftDisconnectOnShutdown(t *testing.T) {
	sawDisc := make(chan bool, 1)
	resent := make(chan Request, 1)
	c := scriptedServers(t, ExportInfo{Size: 1 << 20, Flags: FlagHasFlags}, 10*time.Millisecond, func(r io.Reader, w io.Writer) {
		q, _ := ReadRequest(r)
		io.CopyN(io.Discard, r, int64(q.Length))
		p := AppendErrorChunk(nil, ErrorChunk{Errno: ESHUTDOWN, Message: "going down"})
		w.Write(append(AppendChunkHeader(nil, ReplyFlagDone, ChunkError, q.Cookie, uint32(len(p))), p...))
		q, err := ReadRequest(r)
		sawDisc <- err == nil && q.Command == CmdDisc
	}, func(r io.Reader, w io.Writer) {
		q, _ := ReadRequest(r)
		io.CopyN(io.Discard, r, int64(q.Length))
		w.Write(AppendSimpleReply(nil, q.Cookie, 0))
		resent <- q
		io.Copy(io.Discard, r)
	})
	if err := c.WriteAt(context.Background(), make([]byte, 512), 4096); err != nil {
		t.Fatalf("write answered with ESHUTDOWN, then sent again: %v", err)
	}
	if !<-sawDisc {
		t.Fatal("client did not send NBD_CMD_DISC after ESHUTDOWN")
	}
	if q := <-resent; q.Command != CmdWrite || q.Offset != 4096 || q.Length != 512 {
		t.Fatalf("sent again as %+v", q)
	}
}
