package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// runScrub votes across the replicas of a volume that is not attached,
// region by region, and repairs minorities.
func runScrub(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("scrub", "[engine flags] [--rate SIZE] PATH...", stderr)
	var ef engineFlags
	ef.register(fs)
	var rate sizeFlag
	fs.Var(&rate, "rate", "bytes per second at most (default: as fast as the replicas go)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) < 2 {
		return fmt.Errorf("%w: give at least two replica paths to scrub", errUsage)
	}
	opts, err := ef.options(eventPrinter(&syncWriter{w: stderr}))
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	vol, err := volume.Open(ctx, pos, opts)
	if err != nil {
		return err
	}
	st, err := vol.Scrub(ctx, rate.n)
	if err != nil {
		return closeAfter(vol, fmt.Errorf("scrub: %w", err))
	}
	if err := vol.Close(context.Background()); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "scrubbed %d bytes: %d replica chunks repaired, %d chunks without a majority\n", st.Scanned, st.Repaired, st.Unresolved)
	if st.Unresolved > 0 {
		return &exitError{code: 1, err: fmt.Errorf("%d chunks have no version that reaches the vote threshold; they were left as they are", st.Unresolved)}
	}
	return nil
}
