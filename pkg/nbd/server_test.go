package nbd

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/testutil"
)

func memServer(t testing.TB, network string, m Backend, mods ...func(*ServerConfig)) *testServer {
	cfg := ServerConfig{Exports: []Export{{Name: "mem", Description: "test export", Backend: m}}}
	for _, mod := range mods {
		mod(&cfg)
	}
	return startServer(t, network, cfg)
}

func TestOptionsNegotiation(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	ts := startServer(t, "unix", ServerConfig{Exports: []Export{
		{Name: "mem", Description: "test export", Backend: m},
		{Name: "ro", Backend: newMem(8192, 4096), ReadOnly: true},
	}})
	r := rawDial(t, ts)

	reps := r.opt(OptList, nil)
	if len(reps) != 3 || reps[2].Type != RepAck {
		t.Fatalf("LIST: %+v", reps)
	}
	if name, desc, _ := ParseServerReply(reps[0].Data); name != "mem" || desc != "test export" {
		t.Errorf("LIST first entry %q %q", name, desc)
	}
	if reps := r.opt(OptList, []byte{1}); reps[0].Type != RepErrInvalid {
		t.Errorf("LIST with data: %v", reps[0].Type)
	}
	if reps := r.opt(Option(42), []byte("whatever")); reps[0].Type != RepErrUnsup {
		t.Errorf("unknown option: %v", reps[0].Type)
	}
	if reps := r.opt(OptStartTLS, nil); reps[0].Type != RepErrPolicy {
		t.Errorf("STARTTLS without TLS configured: %v", reps[0].Type)
	}
	if reps := r.opt(OptSetMetaContext, MetaContextRequest{Export: "mem", Queries: []string{MetaBaseAllocation}}.Append(nil)); reps[0].Type != RepErrInvalid {
		t.Errorf("SET_META_CONTEXT before structured replies: %v", reps[0].Type)
	}
	if reps := r.opt(OptInfo, ExportRequest{Name: "nope"}.Append(nil)); reps[0].Type != RepErrUnknown {
		t.Errorf("INFO of unknown export: %v", reps[0].Type)
	}
	if reps := r.opt(OptInfo, []byte{0, 0, 0, 9}); reps[0].Type != RepErrInvalid {
		t.Errorf("INFO malformed: %v", reps[0].Type)
	}

	reps = r.opt(OptInfo, ExportRequest{Name: "ro", Infos: []InfoType{InfoName, InfoDescription}}.Append(nil))
	got := map[InfoType]Info{}
	for _, rep := range reps[:len(reps)-1] {
		i, err := ParseInfo(rep.Data)
		if err != nil {
			t.Fatal(err)
		}
		got[i.Type] = i
	}
	if e := got[InfoExport]; e.Size != 8192 || e.Flags&FlagReadOnly == 0 || e.Flags&FlagSendFlush == 0 {
		t.Errorf("INFO export: %+v", e)
	}
	if b := got[InfoBlockSize]; b.MinBlock != 4096 || b.PrefBlock != 4096 || b.MaxBlock != MaxPayload {
		t.Errorf("INFO block size: %+v", b)
	}
	if got[InfoName].Text != "ro" {
		t.Errorf("INFO name: %+v", got[InfoName])
	}

	if reps := r.opt(OptStructuredReply, nil); reps[0].Type != RepAck {
		t.Fatalf("structured: %v", reps[0].Type)
	}
	reps = r.opt(OptListMetaContext, MetaContextRequest{Export: "mem", Queries: []string{"base:"}}.Append(nil))
	if len(reps) != 2 || reps[0].Type != RepMetaContext {
		t.Fatalf("LIST_META_CONTEXT base: %+v", reps)
	}
	reps = r.opt(OptSetMetaContext, MetaContextRequest{Export: "mem", Queries: []string{"qemu:dirty-bitmap:x", MetaBaseAllocation}}.Append(nil))
	if len(reps) != 2 || reps[0].Type != RepMetaContext {
		t.Fatalf("SET_META_CONTEXT: %+v", reps)
	}
	if id, name, _ := ParseMetaContextReply(reps[0].Data); id != metaContextID || name != MetaBaseAllocation {
		t.Errorf("SET_META_CONTEXT selected %d %q", id, name)
	}
	r.goTo("mem", false)

	// Transmission works, block status included.
	r.send(Request{Command: CmdBlockStatus, Cookie: 1, Offset: 0, Length: 1 << 20}, nil)
	h, p := r.chunk()
	if h.Type != ChunkBlockStatus || !h.Done() {
		t.Fatalf("block status reply %+v", h)
	}
	if id, ext, err := ParseBlockStatus(p); err != nil || id != metaContextID || len(ext) != 1 || ext[0].Length != 1<<20 || ext[0].Flags != 0 {
		t.Fatalf("block status of a backend without extents: %d %+v %v", id, ext, err)
	}
	r.send(Request{Command: CmdDisc}, nil)
	if !r.closed() {
		t.Fatal("server did not close after NBD_CMD_DISC")
	}

	// ABORT is acknowledged and ends the connection.
	r = rawDial(t, ts)
	if reps := r.opt(OptAbort, nil); reps[0].Type != RepAck {
		t.Errorf("ABORT: %v", reps[0].Type)
	}
	if !r.closed() {
		t.Error("server kept the connection after ABORT")
	}

	// EXPORT_NAME, the old way in, with the trailing zeroes the client
	// did not decline... we did decline them (NO_ZEROES).
	r = rawDial(t, ts)
	WriteOption(r.nc, OptionRequest{Option: OptExportName, Data: []byte("mem")})
	size, flags, err := ReadExportNameReply(r.nc, false)
	if err != nil || size != 1<<20 || flags&FlagHasFlags == 0 {
		t.Fatalf("EXPORT_NAME: %d %v %v", size, flags, err)
	}
	r.send(Request{Command: CmdRead, Cookie: 5, Length: 512}, nil)
	if h, data := r.simpleReply(512); h.Errno != 0 || h.Cookie != 5 || len(data) != 512 {
		t.Fatalf("read after EXPORT_NAME: %+v", h)
	}
	// An unknown name there can only be refused by hanging up.
	r = rawDial(t, ts)
	WriteOption(r.nc, OptionRequest{Option: OptExportName, Data: []byte("nope")})
	if !r.closed() {
		t.Error("EXPORT_NAME of an unknown export did not close the connection")
	}
}

func TestRequestErrors(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	ts := startServer(t, "unix", ServerConfig{Exports: []Export{
		{Name: "mem", Backend: m},
		{Name: "ro", Backend: newMem(8192, 512), ReadOnly: true},
	}})
	orig := pattern(1<<20, 3)
	copy(m.data, orig)
	for _, structured := range []bool{false, true} {
		r := rawDial(t, ts)
		r.goTo("mem", structured)
		tests := []struct {
			name string
			q    Request
			want Errno
		}{
			{"unaligned write offset", Request{Command: CmdWrite, Offset: 100, Length: 512}, EINVAL},
			{"unaligned write length", Request{Command: CmdWrite, Offset: 512, Length: 100}, EINVAL},
			{"unaligned read", Request{Command: CmdRead, Offset: 1, Length: 512}, EINVAL},
			{"unaligned trim", Request{Command: CmdTrim, Offset: 0, Length: 511}, EINVAL},
			{"read beyond end", Request{Command: CmdRead, Offset: 1<<20 - 512, Length: 1024}, EINVAL},
			{"write beyond end", Request{Command: CmdWrite, Offset: 1 << 20, Length: 512}, ENOSPC},
			{"zeroes beyond end", Request{Command: CmdWriteZeroes, Offset: 1<<20 - 512, Length: 1024}, ENOSPC},
			{"offset overflow", Request{Command: CmdRead, Offset: ^uint64(0) - 511, Length: 1024}, EINVAL},
			{"read too large", Request{Command: CmdRead, Offset: 0, Length: MaxPayload + 512}, EINVAL},
			{"unknown command", Request{Command: 99, Offset: 0, Length: 512}, EINVAL},
			{"unknown flag", Request{Command: CmdWrite, Flags: 1 << 9, Offset: 0, Length: 512}, EINVAL},
			{"no-hole on a write", Request{Command: CmdWrite, Flags: CmdFlagNoHole, Offset: 0, Length: 512}, EINVAL},
			{"fast zero unadvertised", Request{Command: CmdWriteZeroes, Flags: CmdFlagFastZero, Offset: 0, Length: 512}, EINVAL},
			{"block status unnegotiated", Request{Command: CmdBlockStatus, Offset: 0, Length: 512}, EINVAL},
		}
		for i, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				q := tt.q
				q.Cookie = uint64(100 + i)
				var payload []byte
				if q.Command == CmdWrite {
					payload = bytes.Repeat([]byte{0xee}, int(q.Length))
				}
				r.send(q, payload)
				var h ReplyHeader
				var p []byte
				if structured {
					h, p = r.chunk()
				} else {
					h, _ = r.simpleReply(0)
				}
				errno := h.Errno
				if h.Structured {
					if h.Type != ChunkError || !h.Done() {
						t.Fatalf("reply %+v, want an error chunk", h)
					}
					e, err := ParseErrorChunk(h.Type, p)
					if err != nil {
						t.Fatal(err)
					}
					errno = e.Errno
					t.Logf("message: %s", e.Message)
				}
				if h.Cookie != q.Cookie || errno != tt.want {
					t.Fatalf("reply %+v errno %v, want %v", h, errno, tt.want)
				}
			})
		}
		// The connection survived every one of them.
		r.send(Request{Command: CmdRead, Cookie: 7, Offset: 4096, Length: 512}, nil)
		if structured {
			h, p := r.chunk()
			if h.Type != ChunkOffsetData || !bytes.Equal(p[8:], orig[4096:4096+512]) {
				t.Fatalf("read after errors: %+v", h)
			}
		} else if h, data := r.simpleReply(512); h.Errno != 0 || !bytes.Equal(data, orig[4096:4096+512]) {
			t.Fatalf("read after errors: %+v", h)
		}
	}
	if !bytes.Equal(m.snapshot(), orig) {
		t.Fatal("a refused request changed the export")
	}

	r := rawDial(t, ts)
	r.goTo("ro", false)
	for i, q := range []Request{
		{Command: CmdWrite, Length: 512},
		{Command: CmdTrim, Length: 512},
		{Command: CmdWriteZeroes, Length: 512},
	} {
		q.Cookie = uint64(i + 1)
		var payload []byte
		if q.Command == CmdWrite {
			payload = make([]byte, 512)
		}
		r.send(q, payload)
		if h, _ := r.simpleReply(0); h.Errno != EPERM {
			t.Errorf("%v on a read-only export: %v", q.Command, h.Errno)
		}
	}
	r.send(Request{Command: CmdFlush, Cookie: 9}, nil)
	if h, _ := r.simpleReply(0); h.Errno != 0 {
		t.Errorf("flush on a read-only export: %v", h.Errno)
	}
}

func TestMalformedRequestClosesOnlyThatConnection(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	var logs testutil.SyncBuffer
	ts := memServer(t, "unix", m, func(c *ServerConfig) {
		c.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	good := dial(t, ts, Config{Export: "mem"})

	for _, tt := range []struct {
		name string
		raw  []byte
	}{
		{"bad magic", AppendRequest(nil, Request{Command: CmdRead, Length: 512})[4:]},
		{"oversized write", AppendRequest(nil, Request{Command: CmdWrite, Length: MaxPayload + 4096})},
	} {
		r := rawDial(t, ts)
		r.goTo("mem", true)
		frame := tt.raw
		if tt.name == "bad magic" {
			frame = append([]byte{0xde, 0xad, 0xbe, 0xef}, frame...)
		}
		r.nc.Write(frame)
		if !r.closed() {
			t.Errorf("%s: connection not closed", tt.name)
		}
	}
	if err := good.WriteAt(context.Background(), pattern(4096, 1), 0); err != nil {
		t.Fatalf("another connection broke: %v", err)
	}
	time.Sleep(50 * time.Millisecond)
	if s := logs.String(); !strings.Contains(s, "request magic") || !strings.Contains(s, "write of") {
		t.Errorf("expected a log line per closed connection, got:\n%s", s)
	}
}

func TestRepliesOutOfOrder(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	release := make(chan struct{})
	m.stall("read", 0, 0, func() { <-release })
	ts := memServer(t, "unix", m)
	c := dial(t, ts, Config{Export: "mem"})
	ctx := context.Background()
	slow := make(chan error, 1)
	go func() { slow <- c.ReadAt(ctx, make([]byte, 512), 0) }()
	// The slow read is in flight at the server; others pass it.
	for i := 0; i < 20; i++ {
		if err := c.WriteAt(ctx, pattern(512, byte(i)), 4096); err != nil {
			t.Fatal(err)
		}
		if err := c.ReadAt(ctx, make([]byte, 512), 8192); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case err := <-slow:
		t.Fatalf("slow read finished first: %v", err)
	default:
	}
	close(release)
	if err := <-slow; err != nil {
		t.Fatal(err)
	}
}

func TestShutdownFinishesRequestsInFlight(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	release := make(chan struct{})
	entered := m.stall("write", -1, 8, func() { <-release })
	ts := memServer(t, "unix", m)
	c := dial(t, ts, Config{Export: "mem", MinBackoff: time.Hour})
	ctx := context.Background()
	const n = 4
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() { errs <- c.WriteAt(ctx, pattern(4096, byte(i)), int64(i)*4096) }()
	}
	for i := 0; i < n; i++ {
		<-entered
	}
	shut := make(chan error, 1)
	go func() {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		shut <- ts.Shutdown(sctx)
	}()
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned with requests in flight: %v", err)
	default:
	}
	close(release)
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Errorf("write in flight at shutdown: %v", err)
		}
	}
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-ts.done; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve returned %v", err)
	}
	ts.done <- nil // for the cleanup
	for i := 0; i < n; i++ {
		if got := m.snapshot()[i*4096 : (i+1)*4096]; !bytes.Equal(got, pattern(4096, byte(i))) {
			t.Errorf("write %d lost", i)
		}
	}
	// The client notices; a request waits for a server to come back,
	// here until its context's deadline.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if s, _ := c.State(); s == Disconnected {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("client never noticed the shutdown")
		}
		time.Sleep(10 * time.Millisecond)
	}
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := c.ReadAt(short, make([]byte, 512), 0); !errors.Is(err, ErrDisconnected) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read after shutdown: %v", err)
	}
}

func TestShutdownDeadlineForcesClose(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	entered := m.stall("write", -1, 1, func() { time.Sleep(300 * time.Millisecond) })
	ts := memServer(t, "unix", m)
	c := dial(t, ts, Config{Export: "mem", MinBackoff: time.Hour, Timeout: time.Second})
	errc := writeInFlight(c, entered)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := ts.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown past its deadline: %v", err)
	}
	// The write's reply is lost with the connection; no server comes
	// back, so it fails when its timeout ends.
	if err := <-errc; !errors.Is(err, ErrDisconnected) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("write cut by a forced close: %v", err)
	}
}

func TestFUAFlushes(t *testing.T) {
	m := newMem(1<<20, 512)
	ts := memServer(t, "unix", m)
	r := rawDial(t, ts)
	r.goTo("mem", false)
	r.send(Request{Command: CmdWrite, Flags: CmdFlagFUA, Cookie: 1, Length: 512}, make([]byte, 512))
	if h, _ := r.simpleReply(0); h.Errno != 0 {
		t.Fatal(h.Errno)
	}
	r.send(Request{Command: CmdWriteZeroes, Flags: CmdFlagFUA | CmdFlagNoHole, Cookie: 2, Length: 512}, nil)
	if h, _ := r.simpleReply(0); h.Errno != 0 {
		t.Fatal(h.Errno)
	}
	if f, w, z := m.count("flush"), m.count("write"), m.count("zero"); f != 2 || w != 1 || z != 1 {
		t.Fatalf("flush %d write %d zero %d, want 2 1 1", f, w, z)
	}
	r.send(Request{Command: CmdWriteZeroes, Cookie: 3, Length: 512}, nil)
	r.send(Request{Command: CmdTrim, Cookie: 4, Length: 512}, nil)
	r.simpleReply(0)
	r.simpleReply(0)
	if d := m.count("discard"); d != 2 {
		t.Fatalf("WRITE_ZEROES without NO_HOLE and TRIM: %d discards, want 2", d)
	}
}

func TestServerBackendErrors(t *testing.T) {
	m := newMem(1<<20, 512)
	var mu sync.Mutex
	fail := map[string]error{}
	m.before = func(op string, off, length int64) error {
		mu.Lock()
		defer mu.Unlock()
		return fail[op]
	}
	ts := memServer(t, "unix", m)
	c := dial(t, ts, Config{Export: "mem"})
	ctx := context.Background()
	mu.Lock()
	fail["write"] = errors.Join(errors.New("disk full"), syscall.ENOSPC)
	fail["read"] = errors.New("medium error")
	mu.Unlock()
	err := c.WriteAt(ctx, make([]byte, 512), 0)
	if !errors.Is(err, ENOSPC) || !strings.Contains(err.Error(), "disk full") {
		t.Errorf("write: %v, want ENOSPC with the backend's message", err)
	}
	if err := c.ReadAt(ctx, make([]byte, 512), 0); !errors.Is(err, EIO) {
		t.Errorf("read: %v, want EIO", err)
	}
	mu.Lock()
	clear(fail)
	mu.Unlock()
	if err := c.WriteAt(ctx, make([]byte, 512), 0); err != nil {
		t.Errorf("connection did not survive request errors: %v", err)
	}
}
