package quorum

import (
	"context"
	"fmt"
)

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
	// OnFaulty is called once per child when it becomes faulty, with no
	// other transition in progress, before the request that made it faulty
	// completes. An error fails that request: a write must not be
	// acknowledged when the fact that a replica missed it cannot be kept.
	OnFaulty func(ctx context.Context, child int, cause error) error
	// OnInSync is called when a resynced child holds every region again,
	// after it was flushed and before it serves reads. An error keeps it
	// resyncing (it is retried at the next Probe).
	OnInSync func(ctx context.Context, child int) error
	// RegionSize is the granularity of dirty tracking and resync
	// (default 64 KiB).
	RegionSize int64
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
