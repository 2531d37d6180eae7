package cli

import (
	"fmt"
	"io"

	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

func runCreate(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("create", "--size SIZE PATH...", stderr)
	var size sizeFlag
	fs.Var(&size, "size", "volume size (bytes, or with K, M, G, T); a multiple of 4096")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if size.n == 0 {
		return fmt.Errorf("%w: --size is required", errUsage)
	}
	if err := needArgs(pos, "replica paths"); err != nil {
		return err
	}
	if err := replica.Create(pos, size.n); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "created %d replicas of %d bytes\n", len(pos), size.n)
	return nil
}
