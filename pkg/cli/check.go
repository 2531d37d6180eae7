package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

func runCheck(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("check", "[--json] PATH...", stderr)
	asJSON := fs.Bool("json", false, "print each differing range as a JSON object")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) < 2 {
		return fmt.Errorf("%w: give at least two replica paths to compare", errUsage)
	}
	var diffs int
	var bytes int64
	enc := json.NewEncoder(stdout)
	err = volume.Compare(context.Background(), pos, func(d volume.Diff) {
		diffs++
		bytes += d.Length
		if *asJSON {
			enc.Encode(d)
			return
		}
		var groups []string
		for _, g := range d.Groups {
			groups = append(groups, strings.Join(g, " "))
		}
		fmt.Fprintf(stdout, "differ at %d length %d: %s\n", d.Offset, d.Length, strings.Join(groups, " | "))
	})
	if err != nil {
		return err
	}
	if diffs > 0 {
		return &exitError{code: 1, err: fmt.Errorf("replicas differ in %d ranges, %d bytes", diffs, bytes)}
	}
	if !*asJSON {
		fmt.Fprintf(stdout, "%d replicas identical\n", len(pos))
	}
	return nil
}
