package nbd

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestSplitExportName(t *testing.T) {
	for _, tt := range []struct {
		in    string
		name  string
		epoch uint64
		bad   bool
	}{
		{"vol", "vol", 0, false},
		{"vol@epoch=7", "vol", 7, false},
		{"a@b@epoch=18446744073709551615", "a@b", 1<<64 - 1, false},
		{"vol@epoch=0", "", 0, true},
		{"vol@epoch=07", "", 0, true},
		{"vol@epoch=+7", "", 0, true},
		{"vol@epoch=", "", 0, true},
		{"vol@epoch=x", "", 0, true},
		{"vol@epoch=18446744073709551616", "", 0, true},
	} {
		name, epoch, err := SplitExportName(tt.in)
		if (err != nil) != tt.bad || name != tt.name || epoch != tt.epoch {
			t.Errorf("SplitExportName(%q) = %q %d %v", tt.in, name, epoch, err)
		}
		if !tt.bad && ExportName(name, epoch) != tt.in {
			t.Errorf("ExportName(%q, %d) = %q", name, epoch, ExportName(name, epoch))
		}
	}
}

func fencedServer(t *testing.T, m Backend, store EpochStore) *testServer {
	return startServer(t, "unix", ServerConfig{Exports: []Export{
		{Name: "vol", Backend: m, Epochs: store, AllowPlainRead: true},
		{Name: "strict", Backend: newMem(1<<20, 512), Epochs: &MemEpochs{}},
		{Name: "open", Backend: newMem(1<<20, 512)},
	}})
}

// TestFencingNewerEpochTakesOver is the fencing scenario: a
// second holder with a newer epoch makes the first holder's writes fail,
// and what the new holder wrote is intact.
func TestFencingNewerEpochTakesOver(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	store := EpochFile(filepath.Join(t.TempDir(), "vol.epoch"))
	ts := fencedServer(t, m, store)
	ctx := context.Background()

	a := dial(t, ts, Config{Export: "vol", Epoch: 1, MinBackoff: 5 * time.Millisecond})
	if err := a.WriteAt(ctx, pattern(4096, 0xa), 0); err != nil {
		t.Fatal(err)
	}
	if e, _ := ts.Epoch("vol"); e != 1 {
		t.Fatalf("epoch after the first write: %d", e)
	}

	// B connects with a newer epoch. Until B writes, it is a standby
	// (a KubeVirt live-migration target): it reads, A still writes.
	b := dial(t, ts, Config{Export: "vol", Epoch: 2})
	got := make([]byte, 4096)
	if err := b.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, pattern(4096, 0xa)) {
		t.Fatalf("standby read: %v", err)
	}
	if err := a.WriteAt(ctx, pattern(4096, 0xa), 4096); err != nil {
		t.Fatalf("holder write while the newer epoch is only standing by: %v", err)
	}

	// B's first write makes epoch 2 current: A is fenced.
	if err := b.WriteAt(ctx, pattern(8192, 0xb), 0); err != nil {
		t.Fatal(err)
	}
	if e, _ := ts.Epoch("vol"); e != 2 {
		t.Fatalf("epoch after the new holder's write: %d", e)
	}
	if e, _ := store.LoadEpoch(); e != 2 {
		t.Fatalf("persisted epoch %d", e)
	}
	err := a.WriteAt(ctx, pattern(4096, 0xa), 0)
	if err == nil {
		t.Fatal("the fenced holder's write succeeded")
	}
	t.Logf("fenced holder's write: %v", err)
	waitState(t, a, Fenced)
	if err := a.Flush(ctx); !IsFenced(err) {
		t.Fatalf("fenced holder's flush: %v, want ErrFenced", err)
	}
	if err := a.ReadAt(ctx, got, 0); !IsFenced(err) {
		t.Fatalf("fenced holder's read: %v, want ErrFenced", err)
	}

	// The new holder's data is intact, seen by itself and by a plain
	// read-only client.
	if err := b.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, pattern(8192, 0xb)[:4096]) {
		t.Fatalf("new holder's read: %v", err)
	}
	plain := dial(t, ts, Config{Export: "vol"})
	if plain.Info().Flags&FlagReadOnly == 0 {
		t.Fatal("plain client on a fenced export is not read-only")
	}
	all := make([]byte, 8192)
	if err := plain.ReadAt(ctx, all, 0); err != nil || !bytes.Equal(all, pattern(8192, 0xb)) {
		t.Fatalf("plain read: %v", err)
	}
	if err := plain.WriteAt(ctx, all[:512], 0); !errors.Is(err, EPERM) {
		t.Fatalf("plain write: %v, want EPERM", err)
	}
	if err := plain.Flush(ctx); err != nil {
		t.Fatalf("plain flush (nothing to fence): %v", err)
	}

	// The old epoch cannot come back, not even after a server restart:
	// the epoch was persisted before it took effect.
	if _, err := Dial(ctx, Config{Network: ts.Network, Addr: ts.Addr, Export: "vol", Epoch: 1, Logger: testLogger(t)}); !IsFenced(err) {
		t.Fatalf("reconnect with the old epoch: %v, want ErrFenced", err)
	}
	ts2 := fencedServer(t, m, store)
	if _, err := Dial(ctx, Config{Network: ts2.Network, Addr: ts2.Addr, Export: "vol", Epoch: 1, Logger: testLogger(t)}); !IsFenced(err) {
		t.Fatalf("old epoch after a restart: %v, want ErrFenced", err)
	}
}

// TestFencingNoWriteLandsAfterTakeover hammers one range from the old
// holder while the new holder takes over: every old write completes
// before the new epoch takes effect or is refused, so the range ends up
// with the new holder's bytes.
func TestFencingNoWriteLandsAfterTakeover(t *testing.T) {
	checkNoGoroutines(t)
	m := newMem(1<<20, 512)
	ts := fencedServer(t, m, &MemEpochs{})
	ctx := context.Background()
	a := dial(t, ts, Config{Export: "vol", Epoch: 5, MinBackoff: time.Millisecond})
	b := dial(t, ts, Config{Export: "vol", Epoch: 6})
	old := pattern(64<<10, 0xa)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var ok int
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				if err := a.WriteAt(ctx, old, 0); err != nil {
					return
				}
				mu.Lock()
				ok++
				mu.Unlock()
			}
		}()
	}
	time.Sleep(30 * time.Millisecond)
	newer := pattern(64<<10, 0xb)
	if err := b.WriteAt(ctx, newer, 0); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if !bytes.Equal(m.snapshot()[:64<<10], newer) {
		t.Fatal("a write of the fenced holder landed after the takeover")
	}
	t.Logf("old holder completed %d writes before the takeover", ok)
}

func TestFencingRefusals(t *testing.T) {
	ts := fencedServer(t, newMem(1<<20, 512), &MemEpochs{})
	ctx := context.Background()
	refused := func(cfg Config, want ReplyType) {
		t.Helper()
		cfg.Network, cfg.Addr, cfg.Logger = ts.Network, ts.Addr, testLogger(t)
		_, err := Dial(ctx, cfg)
		var oe *OptionError
		if !errors.As(err, &oe) || oe.Reply != want {
			t.Errorf("%s: %v, want %v", cfg, err, want)
		}
	}
	// An epoch on an export without fencing: refused, not ignored.
	refused(Config{Export: "open", Epoch: 3}, RepErrPolicy)
	// A fenced export without plain reads refuses plain clients.
	refused(Config{Export: "strict"}, RepErrPolicy)
	// A malformed epoch is not a plain connection.
	refused(Config{Export: "vol@epoch=01"}, RepErrInvalid)

	// The server refuses to export names that look like epochs.
	if _, err := NewServer(ServerConfig{Exports: []Export{{Name: "x@epoch=1", Backend: newMem(4096, 512)}}}); err == nil {
		t.Error("export named like an epoch accepted")
	}
}

func TestFencingActivationOnFlushAndStoreFailure(t *testing.T) {
	m := newMem(1<<20, 512)
	store := &failingStore{}
	ts := fencedServer(t, m, store)
	ctx := context.Background()
	a := dial(t, ts, Config{Export: "vol", Epoch: 1})
	if err := a.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if e, _ := ts.Epoch("vol"); e != 1 {
		t.Fatalf("a flush did not activate the epoch: %d", e)
	}
	// If the epoch cannot be persisted, it does not take effect, and the
	// request that presented it fails.
	b := dial(t, ts, Config{Export: "vol", Epoch: 2})
	store.fail(true)
	if err := b.WriteAt(ctx, make([]byte, 512), 0); !errors.Is(err, EIO) || !strings.Contains(err.Error(), "persist epoch") {
		t.Fatalf("write with an epoch that cannot be persisted: %v", err)
	}
	if e, _ := ts.Epoch("vol"); e != 1 {
		t.Fatalf("epoch %d took effect without being persisted", e)
	}
	if err := a.WriteAt(ctx, make([]byte, 512), 0); err != nil {
		t.Fatalf("holder fenced by an epoch that never took effect: %v", err)
	}
	store.fail(false)
	if err := b.WriteAt(ctx, make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
}

type failingStore struct {
	MemEpochs
	mu   sync.Mutex
	bad  bool
	seen []uint64
}

func (s *failingStore) fail(b bool) {
	s.mu.Lock()
	s.bad = b
	s.mu.Unlock()
}

func (s *failingStore) StoreEpoch(e uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.bad {
		return errors.New("disk full")
	}
	s.seen = append(s.seen, e)
	return s.MemEpochs.StoreEpoch(e)
}

func TestEpochFile(t *testing.T) {
	f := EpochFile(filepath.Join(t.TempDir(), "e"))
	if e, err := f.LoadEpoch(); e != 0 || err != nil {
		t.Fatalf("missing file: %d %v", e, err)
	}
	for _, e := range []uint64{1, 42, 1<<64 - 1} {
		if err := f.StoreEpoch(e); err != nil {
			t.Fatal(err)
		}
		if got, err := f.LoadEpoch(); got != e || err != nil {
			t.Fatalf("stored %d, loaded %d %v", e, got, err)
		}
	}
	matches, _ := filepath.Glob(string(f) + ".tmp*")
	if len(matches) != 0 {
		t.Fatalf("temporary files left: %v", matches)
	}
}
