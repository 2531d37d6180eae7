package cli

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quorum-csi/quorum-csi/internal/alignbuf"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// runBench reproduces qemu-img bench's request pattern on the engine in
// process: count requests of buffer-size bytes, depth at a time, the
// offset advancing by step and wrapping at the image's end.
func runBench(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bench", "[flags] PATH...", stderr)
	var ef engineFlags
	ef.register(fs)
	count := fs.Int("c", 75000, "number of requests")
	depth := fs.Int("d", 64, "requests in flight")
	var bufSize, step, offset sizeFlag
	bufSize.n = 4096
	fs.Var(&bufSize, "s", "request size")
	fs.Var(&step, "S", "offset step between requests (default: the request size)")
	fs.Var(&offset, "o", "first offset")
	write := fs.Bool("w", false, "write instead of read")
	pattern := fs.Int("pattern", 0, "byte written by -w")
	noJournal := fs.Bool("without-journal", false, "run without the journal (write intent), to measure its cost; replicas are not crash-consistent then")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if err := needArgs(pos, "replica paths"); err != nil {
		return err
	}
	if *count <= 0 || *depth <= 0 {
		return fmt.Errorf("%w: -c and -d must be positive", errUsage)
	}
	if step.n == 0 {
		step.n = bufSize.n
	}
	opts, err := ef.options(eventPrinter(&syncWriter{w: stderr}))
	if err != nil {
		return err
	}
	opts.WithoutJournal = *noJournal
	vol, err := volume.Open(context.Background(), pos, opts)
	if err != nil {
		return err
	}
	stopProfile, err := profileCPU(ef.cpuProfile)
	if err != nil {
		return closeAfter(vol, err)
	}
	defer stopProfile()
	size := vol.Size()
	var next atomic.Int64
	var failed atomic.Int64
	ctx := context.Background()
	start := time.Now()
	var wg sync.WaitGroup
	for range *depth {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Aligned like QEMU's buffers, so direct I/O needs no bounce copy.
			buf := alignbuf.Make(int(bufSize.n), 0)
			for i := range buf {
				buf[i] = byte(*pattern)
			}
			for {
				n := next.Add(1) - 1
				if n >= int64(*count) {
					return
				}
				off := (offset.n + n*step.n) % size
				var err error
				if *write {
					err = vol.WriteAt(ctx, buf, off)
				} else {
					err = vol.ReadAt(ctx, buf, off)
				}
				if err != nil {
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := vol.Close(ctx); err != nil {
		return err
	}
	if f := failed.Load(); f > 0 {
		return fmt.Errorf("%d of %d requests failed", f, *count)
	}
	fmt.Fprintf(stdout, "Run completed in %.3f seconds: %.0f requests/s\n", elapsed.Seconds(), float64(*count)/elapsed.Seconds())
	return nil
}
