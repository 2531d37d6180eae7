package controller

import (
	"errors"
	"slices"
	"sync"
	"testing"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// TestAttachDetach runs contract.Attach and Detach, as the CSI controller
// does, against a real API server (no reconciler: they need none), and
// checks the Events contract.EventRecorder writes for them.
func TestAttachDetach(t *testing.T) {
	e, _ := startEnv(t)
	ctx := t.Context()
	rec := contract.NewEventRecorder(e.c, FieldManager, "test")
	e.createQV("vol", 3, v1alpha1.Placement{})
	active, standby := v1alpha1.AttachmentActive, v1alpha1.AttachmentStandby

	attach := func(node string, multi bool, want int64) {
		t.Helper()
		got, err := contract.Attach(ctx, e.c, rec, "vol", node, multi)
		if err != nil || got.Epoch != want {
			t.Fatalf("Attach(%s, multiNode=%v) = %+v, %v; want epoch %d", node, multi, got, err, want)
		}
	}
	detach := func(node string) {
		t.Helper()
		if err := contract.Detach(ctx, e.c, rec, "vol", node); err != nil {
			t.Fatalf("Detach(%s): %v", node, err)
		}
	}
	check := func(epoch int64, want ...v1alpha1.Attachment) {
		t.Helper()
		qv := e.get("vol")
		if qv.Status.Epoch != epoch || !slices.EqualFunc(qv.Status.Attachments, want, func(a, b v1alpha1.Attachment) bool {
			return a.Node == b.Node && a.Epoch == b.Epoch && a.Role == b.Role
		}) {
			t.Fatalf("status.epoch %d, attachments %v; want %d, %v", qv.Status.Epoch, qv.Status.Attachments, epoch, want)
		}
	}

	attach("node-a", false, 1)
	attach("node-a", false, 1) // idempotent
	check(1, v1alpha1.Attachment{Node: "node-a", Epoch: 1, Role: active})
	e.waitEvent("vol", "Attached", "Normal", "attached to node-a with epoch 1")

	_, err := contract.Attach(ctx, e.c, rec, "vol", "node-b", false)
	if !errors.Is(err, contract.ErrAttachedElsewhere) {
		t.Fatalf("attach a single-node volume to a second node: %v, want ErrAttachedElsewhere", err)
	}

	detach("node-a")
	detach("node-a") // idempotent
	check(1)
	e.waitEvent("vol", "Detached", "Normal", "detached from node-a (epoch 1)")

	// A new attach never reuses the detached epoch.
	attach("node-b", false, 2)
	// Live migration: a Standby attachment with the next epoch.
	attach("node-c", true, 3)
	check(3, v1alpha1.Attachment{Node: "node-b", Epoch: 2, Role: active}, v1alpha1.Attachment{Node: "node-c", Epoch: 3, Role: standby})
	e.waitEvent("vol", "StandbyAttached", "Normal", "standby attached to node-c with epoch 3 beside node-b")
	attach("node-b", true, 2)
	if _, err := contract.Attach(ctx, e.c, rec, "vol", "node-d", true); !errors.Is(err, contract.ErrTooManyAttachments) {
		t.Fatalf("a third attachment: %v, want ErrTooManyAttachments", err)
	}
	// The target is unpublished: rolled back, the source stays Active.
	detach("node-c")
	check(3, v1alpha1.Attachment{Node: "node-b", Epoch: 2, Role: active})
	e.waitEvent("vol", "MigrationRolledBack", "Normal", "standby node-c (epoch 3) detached; node-b stays active")
	// The source is unpublished: confirmed, the target keeps its epoch
	// and becomes Active.
	attach("node-c", true, 4)
	detach("node-b")
	check(4, v1alpha1.Attachment{Node: "node-c", Epoch: 4, Role: active})
	e.waitEvent("vol", "MigrationConfirmed", "Normal", "source node-b (epoch 2) detached; node-c is active")
	// And back: the old source is the new target.
	attach("node-b", true, 5)
	check(5, v1alpha1.Attachment{Node: "node-c", Epoch: 4, Role: active}, v1alpha1.Attachment{Node: "node-b", Epoch: 5, Role: standby})

	if err := contract.Detach(ctx, e.c, rec, "missing", "node-a"); err != nil {
		t.Errorf("detach a volume that does not exist: %v, want success", err)
	}
	if _, err := contract.Attach(ctx, e.c, rec, "missing", "node-a", false); err == nil {
		t.Errorf("attach a volume that does not exist succeeded")
	}

	t.Run("concurrent", func(t *testing.T) {
		e.t = t
		e.createQV("race", 3, v1alpha1.Placement{})
		const n = 6
		var wg sync.WaitGroup
		epochs := make([]int64, n)
		errs := make([]error, n)
		for i := range n {
			wg.Go(func() {
				var a v1alpha1.Attachment
				a, errs[i] = contract.Attach(t.Context(), e.c, rec, "race", "node-"+string(rune('a'+i)), true)
				epochs[i] = a.Epoch
			})
		}
		wg.Wait()
		var got []int64
		for i, err := range errs {
			switch {
			case err == nil:
				got = append(got, epochs[i])
			case !errors.Is(err, contract.ErrTooManyAttachments):
				t.Errorf("attach node %d: %v, want success or ErrTooManyAttachments", i, err)
			}
		}
		slices.Sort(got)
		if !slices.Equal(got, []int64{1, 2}) {
			t.Errorf("epochs of the attaches that succeeded %v, want exactly [1 2]", got)
		}
		qv := e.get("race")
		if qv.Status.Epoch != 2 || len(qv.Status.Attachments) != 2 {
			t.Fatalf("status.epoch %d with %d attachments, want 2 and 2", qv.Status.Epoch, len(qv.Status.Attachments))
		}
		if a := qv.Status.Attachments; a[0].Role != active || a[0].Epoch != 1 || a[1].Role != standby || a[1].Epoch != 2 {
			t.Errorf("attachments %+v, want epoch 1 Active and epoch 2 Standby", a)
		}
	})
}
