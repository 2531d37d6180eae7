package agent

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/datapath"
)

// DataPathLister is what the watcher asks the node's data path.
type DataPathLister interface {
	Ready(ctx context.Context) error
	List(ctx context.Context) ([]datapath.Status, error)
}

// DataPathWatcher shows in the API when the node's data path stops
// serving a volume attached to the node: the attachment's DataPathReady
// condition turns False, with a Warning Event naming the node, within
// seconds of the data path going down (Grace) or reporting a volume lost
// (a takeover that failed); it turns True again once the volume is
// served. It runs in the CSI node plugin, a process apart from the data
// path, so it sees the data path die. It writes only its own node's
// attachments' condition.
//
// It also shows the engine's view of the volumes whose Active
// attachment is the node's (the engine of a Standby does not resync):
// each replica's outOfSyncBytes, resyncPercent and engineEpoch
// (engineReporter), which the controller turns into state Resyncing.
// It writes them when a replica starts or stops missing writes, and
// progress at most every ProgressInterval; it removes them when the
// engine misses nothing or the volume is unstaged.
type DataPathWatcher struct {
	Client   client.Client
	Node     string
	DataPath DataPathLister
	Events   *VolumeEvents
	// Interval between looks (default 1s); Grace is how long the data
	// path may not answer (a restart) before its volumes are reported
	// (default 3s).
	Interval, Grace time.Duration
	// ProgressInterval is the shortest time between two writes of a
	// volume's engine view that change only how far its resyncs got
	// (default DefaultProgressInterval).
	ProgressInterval time.Duration
	Log              logr.Logger
}

// Run watches until ctx ends.
func (w *DataPathWatcher) Run(ctx context.Context) error {
	interval, grace := w.Interval, w.Grace
	if interval <= 0 {
		interval = time.Second
	}
	if grace <= 0 {
		grace = 3 * time.Second
	}
	// The API is brought up to date when what the data path says
	// changes; seen is what it said last (nil: nothing yet, so the first
	// look sets every attachment of the node, whatever a previous plugin
	// left there).
	var seen map[string]string
	seenDown := ""
	var downSince time.Time
	engines := &engineReporter{c: w.Client, node: w.Node, interval: cmp.Or(w.ProgressInterval, DefaultProgressInterval)}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		want, views, err := w.look(ctx)
		if err == nil {
			if err := engines.report(ctx, views, time.Now()); err != nil {
				w.Log.Error(err, "show the engines' views")
			}
		}
		down := ""
		switch {
		case err != nil && downSince.IsZero():
			downSince = time.Now()
		case err != nil && time.Since(downSince) >= grace:
			down = fmt.Sprintf("the data path on node %s does not answer since %s: %v", w.Node, downSince.Format(time.RFC3339), err)
		case err == nil:
			downSince = time.Time{}
		}
		if err == nil || down != "" {
			changed := seen == nil || (down == "") != (seenDown == "") || (down == "" && !maps.Equal(want, seen))
			if changed && w.show(ctx, want, down) {
				seen, seenDown = want, down
				if seen == nil {
					seen = map[string]string{}
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// look returns, per volume the data path knows, why it does not serve it
// ("" when it does) and its engine's view.
func (w *DataPathWatcher) look(ctx context.Context) (map[string]string, map[string]engineView, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := w.DataPath.Ready(ctx); err != nil {
		return nil, nil, err
	}
	sts, err := w.DataPath.List(ctx)
	if err != nil {
		return nil, nil, err
	}
	want, views := map[string]string{}, map[string]engineView{}
	for _, st := range sts {
		want[st.VolumeID] = st.Lost
		views[st.VolumeID] = viewOf(st)
	}
	return want, views, nil
}

// show sets the DataPathReady condition of every attachment of the
// node: False with why for the volumes want says are lost, or for all
// with down set; True for the others. It reports whether every
// condition is as wanted (else the next look tries again).
func (w *DataPathWatcher) show(ctx context.Context, want map[string]string, down string) bool {
	var list v1alpha1.QuorumVolumeList
	if err := w.Client.List(ctx, &list); err != nil {
		w.Log.Error(err, "list QuorumVolumes to show the data path's state")
		return false
	}
	ok := true
	for i := range list.Items {
		qv := &list.Items[i]
		if !attachedTo(qv, w.Node) {
			continue
		}
		// A volume attached here that the data path does not serve yet
		// is not its fault: only down or lost is.
		why := want[qv.Name]
		if down != "" {
			why = down
		}
		changed, err := w.setCondition(ctx, qv.Name, why)
		if err != nil {
			w.Log.Error(err, "show the data path's state", "volume", qv.Name)
			ok = false
			continue
		}
		if changed && why != "" && w.Events != nil {
			w.Events.Warning(ctx, qv.Name, "DataPathNotServing", "Watch", why)
		}
	}
	return ok
}

func attachedTo(qv *v1alpha1.QuorumVolume, node string) bool {
	for _, a := range qv.Status.Attachments {
		if a.Node == node {
			return true
		}
	}
	return false
}

// setCondition sets the DataPathReady condition of the node's
// attachment: True when why is empty, else False with why. It reports
// whether the condition changed.
func (w *DataPathWatcher) setCondition(ctx context.Context, volume, why string) (changed bool, _ error) {
	cond := metav1.Condition{Type: v1alpha1.AttachmentDataPathReady, Status: metav1.ConditionTrue, Reason: "Serving", Message: "the node's data path serves the volume"}
	if why != "" {
		cond.Status, cond.Reason, cond.Message = metav1.ConditionFalse, "NotServing", why
	}
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		changed = false
		qv := &v1alpha1.QuorumVolume{}
		if err := w.Client.Get(ctx, client.ObjectKey{Name: volume}, qv); err != nil {
			return client.IgnoreNotFound(err)
		}
		for i := range qv.Status.Attachments {
			a := &qv.Status.Attachments[i]
			if a.Node != w.Node {
				continue
			}
			cond.ObservedGeneration = qv.Generation
			old := meta.FindStatusCondition(a.Conditions, cond.Type)
			if old != nil && old.Status == cond.Status && old.Message == cond.Message {
				return nil
			}
			meta.SetStatusCondition(&a.Conditions, cond)
			changed = true
			return w.Client.Status().Update(ctx, qv, client.FieldOwner(FieldManager(w.Node)))
		}
		return nil
	})
	return changed, err
}
