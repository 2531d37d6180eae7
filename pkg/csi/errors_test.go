package csi

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kerrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

func TestToStatus(t *testing.T) {
	qv := schema.GroupResource{Group: "quorum.csi.dev", Resource: "quorumvolumes"}
	for _, tc := range []struct {
		err  error
		want codes.Code
	}{
		{fmt.Errorf("%w: parameter replicas", errInvalidArgument), codes.InvalidArgument},
		{fmt.Errorf("ctx: %w", fmt.Errorf("%w: volume v", errNotFound)), codes.NotFound},
		{fmt.Errorf("%w: differs", errAlreadyExists), codes.AlreadyExists},
		{fmt.Errorf("%w: too big", errOutOfRange), codes.OutOfRange},
		{fmt.Errorf("%w: published", errFailedPrecondition), codes.FailedPrecondition},
		{fmt.Errorf("%w: in flight", errAborted), codes.Aborted},
		{fmt.Errorf("attach v to b: %w: a", contract.ErrAttachedElsewhere), codes.FailedPrecondition},
		{fmt.Errorf("attach v to c: %w", contract.ErrTooManyAttachments), codes.FailedPrecondition},
		{fmt.Errorf("get: %w", context.DeadlineExceeded), codes.DeadlineExceeded},
		{fmt.Errorf("get: %w", context.Canceled), codes.Canceled},
		{fmt.Errorf("get: %w", kerrors.NewNotFound(qv, "v")), codes.NotFound},
		{fmt.Errorf("update: %w", kerrors.NewConflict(qv, "v", errors.New("modified"))), codes.Aborted},
		{fmt.Errorf("create: %w", kerrors.NewInvalid(schema.GroupKind{Group: "quorum.csi.dev", Kind: "QuorumVolume"}, "v", nil)), codes.InvalidArgument},
		{fmt.Errorf("list: %w", kerrors.NewServiceUnavailable("busy")), codes.Unavailable},
		{errors.New("something else"), codes.Internal},
		{status.Error(codes.Unimplemented, "not here"), codes.Unimplemented},
	} {
		got := toStatus(tc.err)
		st, ok := status.FromError(got)
		if !ok || st.Code() != tc.want {
			t.Errorf("toStatus(%v) = %v, want %v", tc.err, got, tc.want)
		} else if st.Message() != tc.err.Error() && tc.want != codes.Unimplemented {
			t.Errorf("toStatus(%v) message %q, want the whole error", tc.err, st.Message())
		}
	}
	if toStatus(nil) != nil {
		t.Errorf("toStatus(nil) is not nil")
	}
}

func TestInflight(t *testing.T) {
	var f inflight
	release, err := f.acquire("v", "CreateVolume")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.acquire("v", "DeleteVolume"); !errors.Is(err, errAborted) {
		t.Errorf("second call on v: %v, want aborted", err)
	}
	other, err := f.acquire("w", "DeleteVolume")
	if err != nil {
		t.Errorf("call on another volume: %v", err)
	}
	other()
	release()
	release, err = f.acquire("v", "DeleteVolume")
	if err != nil {
		t.Errorf("call on v after release: %v", err)
	}
	release()
}
