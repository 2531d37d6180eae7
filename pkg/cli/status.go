package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// statusReport is what an attach tells `quorumctl status`.
type statusReport struct {
	Device        string               `json:"device"`
	VolumeID      string               `json:"volumeID"`
	VoteThreshold int                  `json:"voteThreshold"`
	ReadPattern   quorum.ReadPattern   `json:"readPattern"`
	Children      []quorum.ChildStatus `json:"children"`
	Scrub         volume.ScrubProgress `json:"scrub"`
	// Standby: not activated yet; Fenced: another attach took the
	// replicas over.
	Standby bool `json:"standby,omitempty"`
	Fenced  bool `json:"fenced,omitempty"`
}

func statusSocket(stateDir, volumeID string) string {
	return filepath.Join(stateDir, "status-"+volumeID+".sock")
}

// serveStatus answers every connection on the volume's status socket
// with a JSON report, until ctx ends.
func serveStatus(ctx context.Context, stateDir, device string, vol *volume.Volume) (stop func(), err error) {
	path := statusSocket(stateDir, vol.ID())
	// The volume's replicas are locked by us, so a socket left at this
	// path is from an attach that died.
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("status socket: %w", err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("status socket: %w", err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			json.NewEncoder(c).Encode(statusReport{
				Device: device, VolumeID: vol.ID(), VoteThreshold: vol.VoteThreshold(),
				ReadPattern: vol.ReadPattern(), Children: vol.Status(), Scrub: vol.ScrubProgress(),
				Standby: vol.Standby(), Fenced: vol.Fenced(),
			})
			c.Close()
		}
	}()
	return func() { l.Close() }, nil
}

func runStatus(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", "[--json] [--state-dir DIR] REPLICA_PATH", stderr)
	asJSON := fs.Bool("json", false, "print the report as JSON")
	stateDir := fs.String("state-dir", defaultStateDir(), "the attach's state folder (env QUORUM_STATE_DIR)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("%w: give one replica path of the attached volume", errUsage)
	}
	m, err := replica.ReadMeta(pos[0])
	if err != nil {
		return err
	}
	c, err := net.DialTimeout("unix", statusSocket(*stateDir, m.VolumeID), 5*time.Second)
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("volume %s is not attached here (no status socket in %s)", m.VolumeID, *stateDir)
	}
	if err != nil {
		return fmt.Errorf("status: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	var rep statusReport
	if err := json.NewDecoder(c).Decode(&rep); err != nil {
		return fmt.Errorf("status: %w", err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	state := "active"
	if rep.Standby {
		state = "standby"
	} else if rep.Fenced {
		state = "fenced"
	}
	fmt.Fprintf(stdout, "device %s  volume %s  %s  vote threshold %d  read pattern %s\n", rep.Device, rep.VolumeID, state, rep.VoteThreshold, rep.ReadPattern)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "REPLICA\tSTATE\tDIRTY\tRESYNC\tERROR")
	for _, ch := range rep.Children {
		resync := ""
		if ch.State == quorum.ChildResyncing && ch.ResyncTotal > 0 {
			resync = fmt.Sprintf("%d%% (%d of %d bytes)", ch.ResyncDone*100/ch.ResyncTotal, ch.ResyncDone, ch.ResyncTotal)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", ch.Name, ch.State, ch.DirtyBytes, resync, ch.Error)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if sc := rep.Scrub; sc.Pass > 0 {
		fmt.Fprintf(stdout, "scrub pass %d: %d of %d bytes, %d repaired, %d without a majority\n", sc.Pass, sc.Done, sc.Total, sc.Repaired, sc.Unresolved)
	}
	return nil
}
