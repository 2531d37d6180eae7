package volume

import (
	"bytes"
	"context"
	"fmt"
	"sync"

	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

// Diff is a range where replicas disagree. Groups partitions the replica
// paths by the content they hold there.
type Diff struct {
	Offset int64      `json:"offset"`
	Length int64      `json:"length"`
	Groups [][]string `json:"groups"`
}

const (
	compareChunk = 1 << 20
	compareBlock = 4096
)

// Compare reads the replicas at paths (offline: it refuses replicas that
// are attached) and calls fn for every maximal range, at 4 KiB
// granularity, where they do not all hold the same bytes.
func Compare(ctx context.Context, paths []string, fn func(Diff)) error {
	if err := replica.Distinct(paths); err != nil {
		return err
	}
	var rs []member
	defer func() {
		for _, r := range rs {
			r.Close()
		}
	}()
	for _, p := range paths {
		r, err := replica.OpenReadOnly(p)
		if err != nil {
			return err
		}
		rs = append(rs, localReplica{r})
	}
	if err := checkSameVolume(rs); err != nil {
		return err
	}
	size := rs[0].Size()
	bufs := make([][]byte, len(rs))
	for i := range bufs {
		bufs[i] = make([]byte, compareChunk)
	}
	var pending *Diff
	emit := func() {
		if pending != nil {
			fn(*pending)
			pending = nil
		}
	}
	for off := int64(0); off < size; off += compareChunk {
		n := min(compareChunk, size-off)
		errs := make([]error, len(rs))
		var wg sync.WaitGroup
		for i, r := range rs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = r.ReadAt(ctx, bufs[i][:n], off)
			}()
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				return fmt.Errorf("compare: %w", err)
			}
		}
		if allEqual(bufs, 0, n) {
			emit()
			continue
		}
		for b := int64(0); b < n; b += compareBlock {
			e := min(b+compareBlock, n)
			if allEqual(bufs, b, e) {
				emit()
				continue
			}
			groups := group(bufs, b, e, paths)
			if pending != nil && pending.Offset+pending.Length == off+b && sameGroups(pending.Groups, groups) {
				pending.Length += e - b
				continue
			}
			emit()
			pending = &Diff{Offset: off + b, Length: e - b, Groups: groups}
		}
	}
	emit()
	return nil
}

func allEqual(bufs [][]byte, from, to int64) bool {
	for _, b := range bufs[1:] {
		if !bytes.Equal(bufs[0][from:to], b[from:to]) {
			return false
		}
	}
	return true
}

func group(bufs [][]byte, from, to int64, paths []string) [][]string {
	var groups [][]string
	var reps []int
	for i, b := range bufs {
		placed := false
		for g, r := range reps {
			if bytes.Equal(bufs[r][from:to], b[from:to]) {
				groups[g] = append(groups[g], paths[i])
				placed = true
				break
			}
		}
		if !placed {
			reps = append(reps, i)
			groups = append(groups, []string{paths[i]})
		}
	}
	return groups
}

func sameGroups(a, b [][]string) bool {
	return fmt.Sprint(a) == fmt.Sprint(b)
}
