package controller

import (
	"reflect"
	"strings"
	"testing"
)

const host = "kubernetes.io/hostname"

func node(name string, load int, labels ...string) NodeInfo {
	n := NodeInfo{Name: name, Labels: map[string]string{host: name}, AgentLive: true, Load: load}
	for i := 0; i+1 < len(labels); i += 2 {
		n.Labels[labels[i]] = labels[i+1]
	}
	return n
}

func TestPlace(t *testing.T) {
	noLabel := node("n-nolabel", 0)
	delete(noLabel.Labels, host)
	dead := node("n-dead", 0)
	dead.AgentLive, dead.NotLiveReason = false, "has no agent lease quorum-agent-n-dead (node agent not running)"
	cordoned := node("n-cordoned", 0)
	cordoned.Unschedulable = true

	tests := []struct {
		name     string
		req      PlacementRequest
		nodes    []NodeInfo
		want     []string
		eligible int
		excluded map[string]string // node -> reason substring
	}{{
		name:     "fewest replicas first, ties by name",
		req:      PlacementRequest{Count: 2, SpreadKey: host},
		nodes:    []NodeInfo{node("c", 0), node("a", 2), node("b", 0), node("d", 1)},
		want:     []string{"b", "c"},
		eligible: 4,
	}, {
		name:     "preferred node first even when loaded",
		req:      PlacementRequest{Count: 2, SpreadKey: host, PreferredNode: "a"},
		nodes:    []NodeInfo{node("a", 5), node("b", 0), node("c", 0)},
		want:     []string{"a", "b"},
		eligible: 3,
	}, {
		name:     "preferred node that does not qualify is ignored",
		req:      PlacementRequest{Count: 1, SpreadKey: host, PreferredNode: "n-dead"},
		nodes:    []NodeInfo{dead, node("b", 0)},
		want:     []string{"b"},
		eligible: 1,
		excluded: map[string]string{"n-dead": "node agent not running"},
	}, {
		name:  "distinct spread values",
		req:   PlacementRequest{Count: 2, SpreadKey: "zone"},
		nodes: []NodeInfo{node("a", 0, "zone", "z1"), node("b", 0, "zone", "z1"), node("c", 1, "zone", "z2")},
		want:  []string{"a", "c"}, eligible: 2,
		excluded: map[string]string{"b": "zone=z1, as a which was preferred"},
	}, {
		name: "spread values of existing replicas are taken",
		req: PlacementRequest{Count: 1, SpreadKey: "zone", UsedSpread: map[string]string{"z1": "r0"},
			UsedNodes: map[string]bool{"a": true}},
		nodes: []NodeInfo{node("a", 1, "zone", "z1"), node("b", 0, "zone", "z1"), node("c", 0, "zone", "z2")},
		want:  []string{"c"}, eligible: 1,
		excluded: map[string]string{"a": "holds a replica of this volume already", "b": "zone=z1 is taken by replica r0"},
	}, {
		name:     "selector, label, liveness, cordon",
		req:      PlacementRequest{Count: 1, SpreadKey: host, NodeSelector: map[string]string{"disk": "ssd"}},
		nodes:    []NodeInfo{node("hdd", 0, "disk", "hdd"), withDisk(noLabel), withDisk(dead), withDisk(cordoned), node("ok", 9, "disk", "ssd")},
		want:     []string{"ok"},
		eligible: 1,
		excluded: map[string]string{
			"hdd":        "does not match placement.nodeSelector",
			"n-nolabel":  "lacks the spread label kubernetes.io/hostname",
			"n-dead":     "node agent not running",
			"n-cordoned": "is cordoned",
		},
	}, {
		name:     "too few: nothing is placed",
		req:      PlacementRequest{Count: 3, SpreadKey: host},
		nodes:    []NodeInfo{node("a", 0), node("b", 0), dead},
		want:     nil,
		eligible: 2,
		excluded: map[string]string{"n-dead": "not running"},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := Place(tt.req, tt.nodes)
			if !reflect.DeepEqual(p.Nodes, tt.want) {
				t.Errorf("nodes %v, want %v", p.Nodes, tt.want)
			}
			if p.Eligible != tt.eligible {
				t.Errorf("eligible %d, want %d", p.Eligible, tt.eligible)
			}
			got := map[string]string{}
			for _, e := range p.Excluded {
				got[e.Node] = e.Reason
			}
			if len(got) != len(tt.excluded) {
				t.Errorf("excluded %v, want %v", got, tt.excluded)
			}
			for n, want := range tt.excluded {
				if !strings.Contains(got[n], want) {
					t.Errorf("%s excluded for %q, want %q", n, got[n], want)
				}
			}
		})
	}
}

func withDisk(n NodeInfo) NodeInfo {
	n.Labels["disk"] = "ssd"
	return n
}

func TestInsufficientMessage(t *testing.T) {
	req := PlacementRequest{Count: 3, SpreadKey: host, NodeSelector: map[string]string{"pool": "x"}}
	nodes := []NodeInfo{node("a", 0, "pool", "x"), node("b", 0, "pool", "x"), node("c", 0, "pool", "x"), node("other", 0)}
	nodes[2].AgentLive, nodes[2].NotLiveReason = false, "agent lease quorum-agent-c expired (node agent not renewing)"
	for i := range 20 {
		nodes = append(nodes, node("z"+strings.Repeat("z", i), 0, "pool", "y"))
	}
	p := Place(req, nodes)
	want := "need 3 more node(s) with distinct values of kubernetes.io/hostname, 2 eligible; " +
		"excluded: c agent lease quorum-agent-c expired (node agent not renewing); 21 node(s) do not match placement.nodeSelector"
	if got := p.InsufficientMessage(req); got != want {
		t.Errorf("message\n%s\nwant\n%s", got, want)
	}
}
