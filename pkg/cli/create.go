package cli

import (
	"fmt"
	"io"

	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

func runCreate(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("create", "--size SIZE PATH... | --replace-for REPLICA PATH...", stderr)
	var size sizeFlag
	fs.Var(&size, "size", "volume size (bytes, or with K, M, G, T); a multiple of 4096")
	like := fs.String("replace-for", "", "make empty replicas of this replica's volume, to replace lost ones (they get a full copy at attach)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if err := needArgs(pos, "replica paths"); err != nil {
		return err
	}
	switch {
	case *like != "" && size.n != 0:
		return fmt.Errorf("%w: --size and --replace-for exclude each other (a replacement has its volume's size)", errUsage)
	case *like != "":
		if err := replica.CreateReplacement(pos, *like); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "created %d replacement replicas for the volume of %s\n", len(pos), *like)
		return nil
	case size.n == 0:
		return fmt.Errorf("%w: --size is required", errUsage)
	}
	if err := replica.Create(pos, size.n); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "created %d replicas of %d bytes\n", len(pos), size.n)
	return nil
}
