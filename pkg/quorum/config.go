package quorum

import "fmt"

// ReadPattern selects how reads use the children.
type ReadPattern string

const (
	// ReadPatternQuorum reads every healthy child and votes (QEMU's default).
	ReadPatternQuorum ReadPattern = "quorum"
	// ReadPatternFIFO reads the first healthy child in order, falling back
	// to the next on error.
	ReadPatternFIFO ReadPattern = "fifo"
)

// ParseReadPattern turns a user's string into a ReadPattern.
func ParseReadPattern(s string) (ReadPattern, error) {
	switch p := ReadPattern(s); p {
	case ReadPatternQuorum, ReadPatternFIFO:
		return p, nil
	}
	return "", fmt.Errorf("read pattern %q: want %q or %q", s, ReadPatternQuorum, ReadPatternFIFO)
}

// Config describes an engine. Children are in fifo order.
type Config struct {
	Children []Member
	// VoteThreshold is t, 1 <= t <= len(Children). Zero means a majority.
	VoteThreshold    int
	ReadPattern      ReadPattern
	RewriteCorrupted bool
	// Strict fails a read on any disagreement between children.
	Strict bool
	// OnEvent receives every event. It is called from request goroutines
	// and must not block for long.
	OnEvent func(Event)
	// Journal, when set, persists the write intent and the dirty maps. A
	// child's fault is committed before the request that found it
	// completes (a write must not be acknowledged while the fact that a
	// replica missed it could be lost), and its return to sync before it
	// serves reads. A failed commit fails the requests that waited on it.
	Journal Journal
	// RegionSize is the granularity of dirty tracking and resync
	// (default 64 KiB).
	RegionSize int64
	// ExtentSize (a power of two, a multiple of RegionSize) and
	// ActiveExtents size the write intent; see DefaultExtentSize.
	ExtentSize    int64
	ActiveExtents int
	// Standby, when set, starts the engine as a standby (a live
	// migration's target): it takes nothing over and writes nothing to
	// its children (no resync, no rewrite, no journal record) while it
	// serves reads from the children the members' Dirty maps leave in
	// sync. Its first write, write-zeroes, discard or flush, or
	// Activate, runs Standby to take the children over, then serves.
	Standby Activator
}

// DefaultRegionSize balances resync precision against bitmap size: 2 MiB
// of bitmap per TiB.
const DefaultRegionSize = 64 << 10

// Majority is the default vote threshold for n children, as in QEMU's
// documentation: more than half.
func Majority(n int) int { return n/2 + 1 }

func (c *Config) validate() error {
	n := len(c.Children)
	if n == 0 {
		return fmt.Errorf("no children")
	}
	if c.VoteThreshold == 0 {
		c.VoteThreshold = Majority(n)
	}
	if c.VoteThreshold < 1 || c.VoteThreshold > n {
		return fmt.Errorf("vote threshold %d out of range: want 1 to %d (the number of children)", c.VoteThreshold, n)
	}
	if c.ReadPattern == "" {
		c.ReadPattern = ReadPatternQuorum
	}
	if _, err := ParseReadPattern(string(c.ReadPattern)); err != nil {
		return err
	}
	if c.RewriteCorrupted && c.ReadPattern != ReadPatternQuorum {
		return fmt.Errorf("rewrite-corrupted needs read pattern %q: fifo reads do not vote", ReadPatternQuorum)
	}
	if c.Strict && c.ReadPattern != ReadPatternQuorum {
		return fmt.Errorf("strict mode needs read pattern %q: fifo reads do not compare children", ReadPatternQuorum)
	}
	if c.Strict && c.RewriteCorrupted {
		return fmt.Errorf("strict mode and rewrite-corrupted exclude each other: strict mode fails reads instead of repairing")
	}
	if c.RegionSize == 0 {
		c.RegionSize = DefaultRegionSize
	}
	if c.RegionSize < 512 || c.RegionSize&(c.RegionSize-1) != 0 {
		return fmt.Errorf("region size %d: want a power of two of at least 512", c.RegionSize)
	}
	if c.ExtentSize == 0 {
		c.ExtentSize = DefaultExtentSize
	}
	if c.ExtentSize < c.RegionSize || c.ExtentSize&(c.ExtentSize-1) != 0 {
		return fmt.Errorf("extent size %d: want a power of two of at least the region size %d", c.ExtentSize, c.RegionSize)
	}
	if c.ActiveExtents == 0 {
		c.ActiveExtents = DefaultActiveExtents
	}
	if c.ActiveExtents < 1 {
		return fmt.Errorf("active extents %d: want at least 1", c.ActiveExtents)
	}
	size := c.Children[0].Child.Size()
	inSync := 0
	for _, m := range c.Children {
		if m.Dirty == nil {
			inSync++
		}
	}
	if inSync == 0 {
		return fmt.Errorf("every child starts stale: no source for a resync")
	}
	names := make(map[string]bool, n)
	for i, m := range c.Children {
		if m.Child == nil {
			return fmt.Errorf("child %d (%s) is nil", i, m.Name)
		}
		if names[m.Name] {
			return fmt.Errorf("child name %q given twice", m.Name)
		}
		names[m.Name] = true
		if s := m.Child.Size(); s != size {
			return fmt.Errorf("children differ in size: %s has %d bytes, %s has %d", c.Children[0].Name, size, m.Name, s)
		}
		if m.Dirty != nil && (m.Dirty.RegionSize() != c.RegionSize || m.Dirty.size != size) {
			return fmt.Errorf("child %s: dirty map of another geometry", m.Name)
		}
	}
	return nil
}
