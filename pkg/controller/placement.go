package controller

import (
	"fmt"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/labels"
)

// NodeInfo is what placement needs to know about one node.
type NodeInfo struct {
	Name   string
	Labels map[string]string
	// AgentLive is whether the node's agent Lease is current; the reason
	// says why not, for the condition message.
	AgentLive     bool
	NotLiveReason string
	Unschedulable bool // cordoned: being drained, so no new replicas
	BeingDeleted  bool
	// Load is how many replicas of all volumes, Stale ones not counted,
	// the node holds.
	Load int
}

// PlacementRequest is one volume's placement problem.
type PlacementRequest struct {
	// Count is how many new replicas to place.
	Count         int
	NodeSelector  map[string]string
	SpreadKey     string
	PreferredNode string
	// UsedSpread maps spread values already held by this volume's live
	// (not Stale) replicas to the replica holding it; new replicas must
	// not share them.
	UsedSpread map[string]string
	// UsedNodes are nodes already holding a replica of this volume,
	// Stale ones included: a node that comes back with the same name
	// must not get two replicas of one volume.
	UsedNodes map[string]bool
}

// Exclusion is a node placement did not consider, and why.
type Exclusion struct {
	Node   string
	Reason string
}

// Placement is the outcome: either Nodes has exactly Count entries, or it
// is empty and the volume cannot be placed (Eligible < Count). Nothing is
// half-placed, so a volume never runs with fewer replicas than asked for
// on nodes chosen without the full picture.
type Placement struct {
	Nodes []string
	// Eligible is how many distinct spread values were available.
	Eligible int
	Excluded []Exclusion
}

// Place chooses req.Count nodes, each with its own value of req.SpreadKey
// that no replica of the volume holds yet. req.PreferredNode comes first
// when it qualifies; the rest go to the nodes with the fewest replicas
// (of all volumes), ties broken by name so that the same cluster always
// gives the same answer. It does no I/O.
func Place(req PlacementRequest, nodes []NodeInfo) Placement {
	sel := labels.SelectorFromSet(req.NodeSelector)
	var p Placement
	var eligible []NodeInfo
	for _, n := range nodes {
		if reason := excludeReason(req, sel, n); reason != "" {
			p.Excluded = append(p.Excluded, Exclusion{Node: n.Name, Reason: reason})
			continue
		}
		eligible = append(eligible, n)
	}
	sort.Slice(eligible, func(i, j int) bool {
		a, b := eligible[i], eligible[j]
		if (a.Name == req.PreferredNode) != (b.Name == req.PreferredNode) {
			return a.Name == req.PreferredNode
		}
		if a.Load != b.Load {
			return a.Load < b.Load
		}
		return a.Name < b.Name
	})
	taken := map[string]string{} // spread value -> node chosen for it
	var chosen []string
	for _, n := range eligible {
		v := n.Labels[req.SpreadKey]
		if other, ok := taken[v]; ok {
			p.Excluded = append(p.Excluded, Exclusion{Node: n.Name, Reason: fmt.Sprintf("%s=%s, as %s which was preferred", req.SpreadKey, v, other)})
			continue
		}
		taken[v] = n.Name
		chosen = append(chosen, n.Name)
	}
	p.Eligible = len(chosen)
	if len(chosen) >= req.Count {
		p.Nodes = chosen[:req.Count]
	}
	return p
}

func excludeReason(req PlacementRequest, sel labels.Selector, n NodeInfo) string {
	switch {
	case req.UsedNodes[n.Name]:
		return "holds a replica of this volume already"
	case n.BeingDeleted:
		return "is being deleted"
	case n.Unschedulable:
		return "is cordoned"
	case !sel.Matches(labels.Set(n.Labels)):
		return reasonNotSelected
	}
	v, ok := n.Labels[req.SpreadKey]
	switch {
	case !ok:
		// Without a value there is no way to tell which failure domain
		// the node is in, so it could share one with any other replica.
		return fmt.Sprintf("lacks the spread label %s", req.SpreadKey)
	case req.UsedSpread[v] != "":
		return fmt.Sprintf("%s=%s is taken by replica %s", req.SpreadKey, v, req.UsedSpread[v])
	case !n.AgentLive:
		return n.NotLiveReason
	}
	return ""
}

// reasonNotSelected is counted, not listed, in the condition message: on
// a big cluster most nodes may be outside the selector on purpose.
const reasonNotSelected = "does not match placement.nodeSelector"

// maxExclusionsShown keeps the condition message readable on big
// clusters; the count of the rest is still given.
const maxExclusionsShown = 8

// InsufficientMessage explains an unplaceable volume: how many nodes are
// needed, how many qualify, and why each other node does not.
func (p Placement) InsufficientMessage(req PlacementRequest) string {
	var b strings.Builder
	fmt.Fprintf(&b, "need %d more node(s) with distinct values of %s, %d eligible", req.Count, req.SpreadKey, p.Eligible)
	shown, notSelected := 0, 0
	for _, e := range p.Excluded {
		if e.Reason == reasonNotSelected {
			notSelected++
			continue
		}
		if shown == maxExclusionsShown {
			continue
		}
		if shown == 0 {
			b.WriteString("; excluded: ")
		} else {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s %s", e.Node, e.Reason)
		shown++
	}
	if rest := len(p.Excluded) - notSelected - shown; rest > 0 {
		fmt.Fprintf(&b, "; and %d more", rest)
	}
	if notSelected > 0 {
		fmt.Fprintf(&b, "; %d node(s) do not match placement.nodeSelector", notSelected)
	}
	return b.String()
}
