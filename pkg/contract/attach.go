package contract

import (
	"context"
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	kerrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/events"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

var (
	// ErrAttachedElsewhere: a single-node volume is attached to another
	// node. CSI ControllerPublish maps it to FAILED_PRECONDITION.
	ErrAttachedElsewhere = errors.New("volume is attached to another node")
	// ErrTooManyAttachments: a multi-node volume already has its two
	// attachments (a live migration's source and target). Also
	// FAILED_PRECONDITION.
	ErrTooManyAttachments = errors.New("volume already has two attachments")
)

// MaxAttachments bounds status.attachments, as the API schema does: a
// live migration has one source and one target.
const MaxAttachments = 2

// ConflictBackoff retries resourceVersion conflicts of QuorumVolume
// writes (Attach, Detach, the CSI service's) for about 2.5 s: long enough
// for a cached client to catch up with the write that won, short enough
// to stay within a CSI call's deadline.
var ConflictBackoff = wait.Backoff{Steps: 8, Duration: 10 * time.Millisecond, Factor: 2, Jitter: 0.1}

// AttachedNodes are the nodes qv is attached to, oldest attachment
// first.
func AttachedNodes(qv *v1alpha1.QuorumVolume) []string {
	var nodes []string
	for _, a := range qv.Status.Attachments {
		nodes = append(nodes, a.Node)
	}
	return nodes
}

// Attach attaches volume to node and returns the attachment: the epoch
// node presents to the replica servers and its role. It is idempotent: a
// node already attached gets its attachment back. Otherwise the new
// attachment gets status.epoch+1, which becomes status.epoch, so an epoch
// is never handed out twice and a new holder fences every older one. A
// single-node volume attached elsewhere fails with ErrAttachedElsewhere;
// a multiNode one (RWX block, live migration) takes a second attachment,
// Standby beside the Active one, and fails beyond that with
// ErrTooManyAttachments.
//
// The status is updated with its resourceVersion and conflicts are
// retried, so concurrent attaches and the reconciler never overwrite
// each other. Each new attachment is a Normal Event, reason Attached or
// StandbyAttached, recorded with rec (NewEventRecorder with
// ControllerFieldManager in the CSI controller).
func Attach(ctx context.Context, c client.Client, rec events.EventRecorder, volume, node string, multiNode bool) (v1alpha1.Attachment, error) {
	var att v1alpha1.Attachment
	var qv *v1alpha1.QuorumVolume
	created := false
	err := retry.OnError(ConflictBackoff, kerrors.IsConflict, func() error {
		qv = &v1alpha1.QuorumVolume{}
		if err := c.Get(ctx, client.ObjectKey{Name: volume}, qv); err != nil {
			return err
		}
		for _, a := range qv.Status.Attachments {
			if a.Node == node {
				att, created = a, false
				return nil
			}
		}
		n := len(qv.Status.Attachments)
		if n > 0 && !multiNode {
			return fmt.Errorf("%w: %s", ErrAttachedElsewhere, qv.Status.Attachments[0].Node)
		} else if n >= MaxAttachments {
			return fmt.Errorf("%w: %s and %s", ErrTooManyAttachments, qv.Status.Attachments[0].Node, qv.Status.Attachments[1].Node)
		}
		att = v1alpha1.Attachment{Node: node, Epoch: qv.Status.Epoch + 1, Role: v1alpha1.AttachmentActive}
		if n > 0 {
			att.Role = v1alpha1.AttachmentStandby
		}
		created = true
		qv.Status.Epoch = att.Epoch
		qv.Status.Attachments = append(qv.Status.Attachments, att)
		return c.Status().Update(ctx, qv, client.FieldOwner(ControllerFieldManager))
	})
	if err != nil {
		return v1alpha1.Attachment{}, fmt.Errorf("attach %s to %s: %w", volume, node, err)
	}
	switch {
	case created && att.Role == v1alpha1.AttachmentStandby:
		rec.Eventf(qv, nil, corev1.EventTypeNormal, "StandbyAttached", "Attach",
			"live migration: standby attached to %s with epoch %d beside %s, which stays active", node, att.Epoch, activeNode(qv))
	case created:
		rec.Eventf(qv, nil, corev1.EventTypeNormal, "Attached", "Attach", "attached to %s with epoch %d", node, att.Epoch)
	}
	return att, nil
}

// activeNode is the node of qv's Active attachment, or "" if none.
func activeNode(qv *v1alpha1.QuorumVolume) string {
	for _, a := range qv.Status.Attachments {
		if a.Role != v1alpha1.AttachmentStandby {
			return a.Node
		}
	}
	return ""
}

// Detach removes node's attachment of volume. status.epoch stays, so the
// next attach gets a newer epoch than any the detached node held.
// Detaching the Active attachment while a Standby exists confirms a live
// migration: the Standby becomes Active. Detaching the Standby rolls it
// back: the Active one stays. Detaching a node that is not attached, or
// a volume that is gone, succeeds: CSI retries unpublish until it does.
// A removed attachment is a Normal Event recorded with rec, reason
// Detached, MigrationConfirmed or MigrationRolledBack.
func Detach(ctx context.Context, c client.Client, rec events.EventRecorder, volume, node string) error {
	var qv *v1alpha1.QuorumVolume
	var held v1alpha1.Attachment
	var promoted string
	err := retry.OnError(ConflictBackoff, kerrors.IsConflict, func() error {
		qv = &v1alpha1.QuorumVolume{}
		held, promoted = v1alpha1.Attachment{}, ""
		if err := c.Get(ctx, client.ObjectKey{Name: volume}, qv); err != nil {
			return client.IgnoreNotFound(err)
		}
		kept := qv.Status.Attachments[:0]
		for _, a := range qv.Status.Attachments {
			if a.Node == node {
				held = a
				continue
			}
			kept = append(kept, a)
		}
		if held.Epoch == 0 {
			return nil
		}
		if held.Role != v1alpha1.AttachmentStandby {
			for i := range kept {
				if kept[i].Role == v1alpha1.AttachmentStandby {
					kept[i].Role, promoted = v1alpha1.AttachmentActive, kept[i].Node
				}
			}
		}
		qv.Status.Attachments = kept
		return c.Status().Update(ctx, qv, client.FieldOwner(ControllerFieldManager))
	})
	if err != nil {
		return fmt.Errorf("detach %s from %s: %w", volume, node, err)
	}
	switch {
	case held.Epoch == 0:
	case promoted != "":
		rec.Eventf(qv, nil, corev1.EventTypeNormal, "MigrationConfirmed", "Detach",
			"live migration confirmed: source %s (epoch %d) detached; %s is active", node, held.Epoch, promoted)
	case held.Role == v1alpha1.AttachmentStandby:
		rec.Eventf(qv, nil, corev1.EventTypeNormal, "MigrationRolledBack", "Detach",
			"live migration rolled back: standby %s (epoch %d) detached; %s stays active", node, held.Epoch, activeNode(qv))
	default:
		rec.Eventf(qv, nil, corev1.EventTypeNormal, "Detached", "Detach", "detached from %s (epoch %d); status.epoch stays %d", node, held.Epoch, qv.Status.Epoch)
	}
	return nil
}
