package agent

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
	"github.com/quorum-csi/quorum-csi/pkg/datapath"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// DefaultProgressInterval is the shortest time between two writes of a
// volume's engine view that change only how far its resyncs got.
const DefaultProgressInterval = 5 * time.Second

// progress is what an engine says of one replica that misses writes.
type progress struct {
	bytes   int64 // out of sync
	percent int32 // of the running resync; -1 when none runs
}

// engineView is what a staged volume's engine says of the replicas that
// miss writes, by child name (the replica's URI), with the epoch of the
// attachment. A standby or fenced engine has no view: it does not
// resync, and another attachment writes.
type engineView struct {
	epoch    int64
	children map[string]progress
}

func viewOf(st datapath.Status) engineView {
	v := engineView{epoch: int64(st.Epoch), children: map[string]progress{}}
	if st.Lost != "" || st.Standby || st.Fenced {
		return v
	}
	for _, ch := range st.Children {
		if ch.DirtyBytes <= 0 {
			continue
		}
		p := progress{bytes: ch.DirtyBytes, percent: -1}
		if ch.State == quorum.ChildResyncing && ch.ResyncTotal > 0 {
			p.percent = int32(min(100, ch.ResyncDone*100/ch.ResyncTotal))
		}
		v.children[ch.Name] = p
	}
	return v
}

// onlyProgress reports whether v differs from old in how far the
// resyncs got, and in nothing else: the same replicas miss writes.
func (v engineView) onlyProgress(old engineView) bool {
	if v.epoch != old.epoch || len(v.children) != len(old.children) {
		return false
	}
	for c := range v.children {
		if _, ok := old.children[c]; !ok {
			return false
		}
	}
	return true
}

func (v engineView) equal(old engineView) bool {
	return v.epoch == old.epoch && maps.Equal(v.children, old.children)
}

// engineReporter writes the engines' views of a node's staged volumes,
// each when it changes: at once when a replica starts or stops missing
// writes, at most once per interval when only the progress changes, not
// at all while nothing changes. A view the API cannot take yet (the
// node's attachment is not the Active one yet: a live migration's
// target that activated before its source was unpublished), and a
// write that failed, are tried again once per interval.
type engineReporter struct {
	c        client.Client
	node     string
	interval time.Duration
	// sent is, per volume, the view last written (or found in the API)
	// and when; a volume missing from it is looked up once.
	sent map[string]sentView
}

type sentView struct {
	view engineView
	at   time.Time
	// held: the node's attachment was not the Active one, so the view
	// was not shown; failed: the last write failed (view is still the
	// one before).
	held, failed bool
}

// report brings the API up to date with views, the views of the volumes
// the data path serves now. It returns the first error.
func (r *engineReporter) report(ctx context.Context, views map[string]engineView, now time.Time) error {
	if r.sent == nil {
		r.sent = map[string]sentView{}
	}
	var first error
	try := func(vol string, v engineView) bool {
		held, err := r.write(ctx, vol, v)
		if err != nil {
			first = cmp.Or(first, err)
			old := r.sent[vol]
			old.at, old.failed = now, true
			r.sent[vol] = old
			return false
		}
		r.sent[vol] = sentView{view: v, at: now, held: held}
		return true
	}
	for vol, v := range views {
		old, known := r.sent[vol]
		due := now.Sub(old.at) >= r.interval
		switch {
		case !known:
		case old.held || old.failed:
			if !due {
				continue
			}
		case v.equal(old.view):
			continue
		case v.onlyProgress(old.view) && !due:
			continue
		}
		try(vol, v)
	}
	// Unstaged: what it wrote goes.
	for vol, old := range r.sent {
		if _, ok := views[vol]; ok {
			continue
		}
		switch {
		case len(old.view.children) == 0 && !old.failed:
			delete(r.sent, vol)
		case old.failed && now.Sub(old.at) < r.interval:
		case try(vol, engineView{epoch: old.view.epoch}):
			delete(r.sent, vol)
		}
	}
	return first
}

// write shows v in volume vol's status: outOfSyncBytes, resyncPercent
// and engineEpoch of each replica v names, by server-side apply with the
// node's EngineFieldManager and only those fields; the entries it leaves
// out lose what it wrote there before. Only the Active attachment's
// engine writes: the node's view is shown only while its attachment is
// Active with v's epoch (held reports that it is not), and otherwise it
// withdraws what it wrote. Nothing is written when the status already
// shows what it should.
func (r *engineReporter) write(ctx context.Context, vol string, v engineView) (held bool, _ error) {
	qv := &v1alpha1.QuorumVolume{}
	if err := r.c.Get(ctx, client.ObjectKey{Name: vol}, qv); err != nil {
		return false, client.IgnoreNotFound(err)
	}
	want := map[string]progress{}
	if activeHere(qv, r.node, v.epoch) {
		for child, p := range v.children {
			if rep := contract.ChildReplica(qv, r.node, child); rep != "" {
				want[rep] = p
			}
		}
	} else {
		held = len(v.children) > 0
	}
	shown := map[string]progress{}
	for _, e := range qv.Status.Replicas {
		if e.EngineEpoch == v.epoch && e.OutOfSyncBytes > 0 {
			p := progress{bytes: e.OutOfSyncBytes, percent: -1}
			if e.ResyncPercent != nil {
				p.percent = *e.ResyncPercent
			}
			shown[e.Name] = p
		}
	}
	manager := contract.EngineFieldManager(r.node)
	if maps.Equal(want, shown) && (len(want) > 0 || !ownsStatus(qv, manager)) {
		return held, nil
	}
	entries := make([]any, 0, len(want))
	for rep, p := range want {
		e := map[string]any{"name": rep, "outOfSyncBytes": p.bytes, "engineEpoch": v.epoch}
		if p.percent >= 0 {
			e["resyncPercent"] = int64(p.percent)
		}
		entries = append(entries, e)
	}
	if err := applyReplicas(ctx, r.c, qv, manager, entries); err != nil {
		return held, fmt.Errorf("report the engine's view of %s: %w", vol, err)
	}
	return held, nil
}

// activeHere reports whether node holds qv's Active attachment with
// epoch.
func activeHere(qv *v1alpha1.QuorumVolume, node string, epoch int64) bool {
	for _, a := range qv.Status.Attachments {
		if a.Node == node && a.Epoch == epoch && a.Role != v1alpha1.AttachmentStandby {
			return true
		}
	}
	return false
}
