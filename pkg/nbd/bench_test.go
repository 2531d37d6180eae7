package nbd

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

// Loopback throughput of our client against our server, as a sanity
// check of the transport (the device-level comparison lives in bench/):
//
//	go test -run='^$' -bench=. -benchtime=3s ./pkg/nbd/
//
// "mem" exports memory, so it measures the protocol and the sockets
// alone; "replica" exports a replica file (O_DIRECT, io_uring) and
// "local" reads and writes that same file directly, for the ratio.
// Requests are random over 256 MiB with 32 in flight.

const benchSize = 256 << 20

func BenchmarkLoopback(b *testing.B) {
	for _, backend := range []string{"mem", "replica", "local"} {
		for _, size := range []int{4 << 10, 1 << 20} {
			for _, write := range []bool{false, true} {
				op := "read"
				if write {
					op = "write"
				}
				b.Run(fmt.Sprintf("%s/%s-%s", backend, op, sizeName(size)), func(b *testing.B) {
					benchIO(b, backend, size, write)
				})
			}
		}
	}
}

func sizeName(n int) string {
	if n >= 1<<20 {
		return fmt.Sprintf("%dM", n>>20)
	}
	return fmt.Sprintf("%dk", n>>10)
}

type child interface {
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64) error
}

func benchIO(b *testing.B, backend string, size int, write bool) {
	var be Backend
	switch backend {
	case "mem":
		be = newMem(benchSize, 512)
	default:
		path := filepath.Join(b.TempDir(), "r.img")
		if err := replica.Create([]string{path}, benchSize); err != nil {
			b.Fatal(err)
		}
		r, err := replica.Open(path)
		if err != nil {
			b.Skip(err) // no direct I/O in TMPDIR
		}
		b.Cleanup(func() { r.Close() })
		// Fill it, so that reads hit allocated blocks.
		buf := getBuf(1 << 20)
		for off := int64(0); off < benchSize; off += 1 << 20 {
			r.WriteAt(context.Background(), buf, off)
		}
		putBuf(buf)
		be = r
	}
	var c child = be
	if backend != "local" {
		ts := startServer(b, "tcp", ServerConfig{Exports: []Export{{Name: "b", Backend: be}}, Logger: slog.New(slog.DiscardHandler)})
		c = dial(b, ts, Config{Export: "b", Logger: slog.New(slog.DiscardHandler)})
	}
	b.SetBytes(int64(size))
	b.SetParallelism(32 / max(1, runtimeProcs()))
	var seed atomic.Uint64
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(seed.Add(1), 3))
		buf := getBuf(size)
		defer putBuf(buf)
		ctx := context.Background()
		blocks := int64(benchSize / size)
		for pb.Next() {
			off := rng.Int64N(blocks) * int64(size)
			var err error
			if write {
				err = c.WriteAt(ctx, buf, off)
			} else {
				err = c.ReadAt(ctx, buf, off)
			}
			if err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func runtimeProcs() int { return runtime.GOMAXPROCS(0) }
