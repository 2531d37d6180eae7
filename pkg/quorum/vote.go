package quorum

import (
	"bytes"
	"crypto/sha256"
)

// version is one distinct content among the children's replies. members
// holds positions in the reply slice, in configured child order.
type version struct {
	members []int
}

// tally groups replies by identical content. nil entries did not reply
// and are skipped. The common case, all equal, costs one comparison per
// reply and no hashing.
func tally(replies [][]byte) []version {
	first := -1
	allEqual := true
	for i, r := range replies {
		if r == nil {
			continue
		}
		if first < 0 {
			first = i
			continue
		}
		if !bytes.Equal(replies[first], r) {
			allEqual = false
			break
		}
	}
	if first < 0 {
		return nil
	}
	if allEqual {
		v := version{}
		for i, r := range replies {
			if r != nil {
				v.members = append(v.members, i)
			}
		}
		return []version{v}
	}
	// Hashes only narrow the candidates; equality is still decided on the
	// bytes, so a collision can never make two versions one.
	var versions []version
	var sums [][sha256.Size]byte
	for i, r := range replies {
		if r == nil {
			continue
		}
		sum := sha256.Sum256(r)
		placed := false
		for j := range versions {
			if sums[j] == sum && bytes.Equal(replies[versions[j].members[0]], r) {
				versions[j].members = append(versions[j].members, i)
				placed = true
				break
			}
		}
		if !placed {
			versions = append(versions, version{members: []int{i}})
			sums = append(sums, sum)
		}
	}
	return versions
}

// winner picks the version with the most votes; among equals, the one
// whose first member comes first. versions come from tally, so they are
// already ordered by first member.
func winner(versions []version) int {
	best := -1
	for i, v := range versions {
		if best < 0 || len(v.members) > len(versions[best].members) {
			best = i
		}
	}
	return best
}
