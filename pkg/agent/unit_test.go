package agent

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/nbd"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

func TestEndpoint(t *testing.T) {
	tests := []struct {
		advertise, listen, want, wantErr string
	}{
		{advertise: "10.0.0.7", listen: "0.0.0.0:10809", want: "10.0.0.7:10809"},
		{listen: "127.0.0.2:4000", want: "127.0.0.2:4000"},
		{advertise: "fd00::7", listen: "[::]:10809", want: "[fd00::7]:10809"},
		{listen: "0.0.0.0:10809", wantErr: "--advertise-address"},
		{listen: "[::]:10809", wantErr: "--advertise-address"},
	}
	for _, tc := range tests {
		addr, err := net.ResolveTCPAddr("tcp", tc.listen)
		if err != nil {
			t.Fatal(err)
		}
		got, err := endpoint(tc.advertise, addr)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("endpoint(%q, %s): %q, %v; want an error containing %q", tc.advertise, tc.listen, got, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("endpoint(%q, %s) = %q, %v; want %q", tc.advertise, tc.listen, got, err, tc.want)
		}
	}
}

func TestConfigDefaults(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{name: "defaults", cfg: Config{Node: "n1", DataDir: "/d"}},
		{name: "no node", cfg: Config{DataDir: "/d"}, wantErr: "no node name"},
		{name: "no data", cfg: Config{Node: "n1"}, wantErr: "no data folder"},
		{name: "renew too slow", cfg: Config{Node: "n1", DataDir: "/d", LeaseDuration: time.Second, RenewInterval: time.Second}, wantErr: "shorter than the lease duration"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.setDefaults()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("%v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			c := tc.cfg
			if err != nil || c.Namespace != DefaultNamespace || c.Listen != ":10809" || c.LeaseDuration != 30*time.Second || c.RenewInterval != 10*time.Second {
				t.Fatalf("%v, %+v", err, c)
			}
		})
	}
}

func TestTransitionTime(t *testing.T) {
	then := metav1.NewTime(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	now := time.Date(2026, 2, 3, 4, 5, 6, 700, time.UTC)
	qv := &v1alpha1.QuorumVolume{Status: v1alpha1.QuorumVolumeStatus{Replicas: []v1alpha1.ReplicaStatus{
		{Name: "r1", State: v1alpha1.ReplicaHealthy, LastTransitionTime: then},
		{Name: "r2", State: v1alpha1.ReplicaCreating, LastTransitionTime: then},
		{Name: "r3", State: v1alpha1.ReplicaHealthy},
	}}}
	tests := []struct {
		name  string
		state v1alpha1.ReplicaState
		want  time.Time
	}{
		{"r1", v1alpha1.ReplicaHealthy, then.Time},                 // state stays: kept
		{"r2", v1alpha1.ReplicaHealthy, now.Truncate(time.Second)}, // state changes
		{"r3", v1alpha1.ReplicaHealthy, now.Truncate(time.Second)}, // never set
		{"r4", v1alpha1.ReplicaFaulty, now.Truncate(time.Second)},  // new entry
		{"r1", v1alpha1.ReplicaFaulty, now.Truncate(time.Second)},  // fails
	}
	for _, tc := range tests {
		if got := transitionTime(qv, tc.name, tc.state, now); !got.Equal(tc.want) {
			t.Errorf("%s -> %s: %v, want %v", tc.name, tc.state, got, tc.want)
		}
	}
}

// memBackend is an in-memory export backend.
type memBackend struct {
	data    []byte
	entered chan struct{} // when set, reads say they started
	block   chan struct{} // and wait for it
	fail    error
}

func (b *memBackend) Size() int64 { return int64(len(b.data)) }
func (b *memBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	if b.block != nil {
		close(b.entered)
		<-b.block
	}
	copy(p, b.data[off:])
	return b.fail
}
func (b *memBackend) WriteAt(ctx context.Context, p []byte, off int64) error {
	copy(b.data[off:], p)
	return b.fail
}
func (b *memBackend) Flush(ctx context.Context) error                          { return b.fail }
func (b *memBackend) Discard(ctx context.Context, off, length int64) error     { return b.fail }
func (b *memBackend) WriteZeroes(ctx context.Context, off, length int64) error { return b.fail }

func TestBackendCounts(t *testing.T) {
	m := newMetrics()
	mem := &memBackend{data: make([]byte, 8192)}
	b := &backend{Backend: mem, volume: "v", m: m}
	ctx := context.Background()
	p := make([]byte, 4096)
	for range 3 {
		if err := b.WriteAt(ctx, p, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.ReadAt(ctx, p, 4096); err != nil {
		t.Fatal(err)
	}
	mem.fail = syscall.EIO
	if err := b.Flush(ctx); !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush: %v", err)
	}
	for _, tc := range []struct {
		vec       string
		op        string
		got, want float64
	}{
		{"bytes", "write", value(t, m.bytes.WithLabelValues("v", "write")), 3 * 4096},
		{"bytes", "read", value(t, m.bytes.WithLabelValues("v", "read")), 4096},
		{"requests", "write", value(t, m.ops.WithLabelValues("v", "write")), 3},
		{"requests", "flush", value(t, m.ops.WithLabelValues("v", "flush")), 1},
		{"errors", "flush", value(t, m.ioErrors.WithLabelValues("v", "flush")), 1},
		{"errors", "write", value(t, m.ioErrors.WithLabelValues("v", "write")), 0},
	} {
		if tc.got != tc.want {
			t.Errorf("%s{op=%s} = %v, want %v", tc.vec, tc.op, tc.got, tc.want)
		}
	}
	if bs := b.BlockSize(); bs != 1 {
		t.Errorf("block size of a backend without one: %d", bs)
	}
	if x, err := b.Extents(ctx, 0, 8192); err != nil || len(x) != 1 || x[0] != (nbd.Extent{Length: 8192}) {
		t.Errorf("extents of a backend without a map: %v, %v", x, err)
	}
}

// TestBackendDrain checks that drain waits for a request in flight and
// that later requests are refused, so the replica can be closed safely.
func TestBackendDrain(t *testing.T) {
	mem := &memBackend{data: make([]byte, 4096), entered: make(chan struct{}), block: make(chan struct{})}
	b := &backend{Backend: mem, volume: "v"}
	read := make(chan error, 1)
	go func() { read <- b.ReadAt(context.Background(), make([]byte, 512), 0) }()
	<-mem.entered
	drained := make(chan struct{})
	go func() {
		b.drain()
		close(drained)
	}()
	select {
	case <-drained:
		t.Fatal("drain returned while a read was in flight")
	case <-time.After(50 * time.Millisecond):
	}
	close(mem.block)
	if err := <-read; err != nil {
		t.Fatalf("read in flight: %v", err)
	}
	<-drained
	if err := b.WriteAt(context.Background(), make([]byte, 512), 0); !errors.Is(err, syscall.ESHUTDOWN) {
		t.Fatalf("write after drain: %v, want ESHUTDOWN", err)
	}
}

func value(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// exports is an exportServer that records what is exported.
type exports map[string]bool

func (x exports) AddExport(e nbd.Export) error { x[e.Name] = true; return nil }
func (x exports) RemoveExport(name string) error {
	delete(x, name)
	return nil
}

// TestServeOnDisk: a restarted agent serves the replicas it finds before
// it reaches the API server; a placement confirms one, and only the
// unconfirmed ones stop as orphans.
func TestServeOnDisk(t *testing.T) {
	dir := t.TempDir()
	const size = 1 << 20
	create := func(vol, file, uid, rep string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(dir, vol), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := replica.CreateWithID(filepath.Join(dir, vol, file+imageSuffix), size, uid, rep); err != nil {
			t.Fatal(err)
		}
	}
	create("placed", "r1", "uid-placed", "r1")
	create("orphan", "r2", "uid-orphan", "r2")
	create("two", "a", "uid-two", "a")
	create("two", "b", "uid-two", "b")
	create("renamed", "r3", "uid-renamed", "other")

	x := exports{}
	set := &replicaSet{dir: dir, srv: x, m: newMetrics(), log: logr.Discard(), served: map[string]*served{}}
	t.Cleanup(func() { set.stopAll() })
	set.serveOnDisk()
	for _, name := range []string{"placed", "orphan"} {
		if !x[name] {
			t.Errorf("export %s not served from disk: %v", name, x)
		}
	}
	for _, name := range []string{"two", "renamed"} {
		if x[name] {
			t.Errorf("export %s served from disk, want it left to the reconciler", name)
		}
	}
	if err := set.ensure("placed", "uid-placed", "r1", size); err != nil {
		t.Fatalf("ensure the replica served from disk: %v", err)
	}
	if err := set.ensure("orphan", "uid-new", "r2", size); err == nil {
		t.Error("ensure of another uid under a served export: no error")
	}
	for _, tc := range []struct {
		vol            string
		stop, exported bool
	}{{"placed", false, true}, {"orphan", true, false}, {"two", false, false}} {
		stopped, err := set.stopUnconfirmed(tc.vol)
		if err != nil || stopped != tc.stop || x[tc.vol] != tc.exported {
			t.Errorf("stopUnconfirmed(%s): %v, %v (exported %v), want stopped %v, exported %v", tc.vol, stopped, err, x[tc.vol], tc.stop, tc.exported)
		}
	}
}
