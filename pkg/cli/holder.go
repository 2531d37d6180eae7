package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os/signal"
	"syscall"

	"github.com/quorum-csi/quorum-csi/pkg/attach/holder"
)

func runFUSEHolder(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("fuse-holder", "--socket PATH [--exit-when-empty]", stderr)
	sock := fs.String("socket", "", "Unix socket to listen at; attach looks for holders at STATE-DIR/holder-*.sock")
	exitEmpty := fs.Bool("exit-when-empty", false, "exit once it holds no connection (or when none is handed to it within a minute)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 || *sock == "" {
		return fmt.Errorf("%w: want --socket PATH and no arguments", errUsage)
	}
	log := slog.New(slog.NewJSONHandler(&syncWriter{w: stderr}, nil))
	h, err := holder.Listen(*sock, holder.Options{
		ExitWhenEmpty: *exitEmpty,
		Logf:          func(f string, a ...any) { log.Info(fmt.Sprintf(f, a...)) },
	})
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, *sock)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return h.Serve(ctx)
}
