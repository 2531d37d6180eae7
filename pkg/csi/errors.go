package csi

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kerrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"

	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

// The kinds of failure a CSI call reports. Handlers wrap one of these
// with what failed (fmt.Errorf("%w: ...", errInvalidArgument)) and never
// build a gRPC status themselves; toStatus, applied to every call by the
// server's interceptor, is the one place where errors become codes.
var (
	errInvalidArgument    = errors.New("invalid argument")
	errNotFound           = errors.New("not found")
	errAlreadyExists      = errors.New("already exists")
	errOutOfRange         = errors.New("out of range")
	errFailedPrecondition = errors.New("failed precondition")
	// errAborted: another call on the same volume is in flight, the
	// volume is being deleted, or a ListVolumes token is no longer valid.
	// The CO retries.
	errAborted = errors.New("aborted")
)

// arg is a field CSI requires of a request, and whether the request has
// it.
type arg struct {
	name string
	set  bool
}

// required is INVALID_ARGUMENT naming the first of args the request
// lacks, checked in the order given, or nil when it has them all.
func required(args ...arg) error {
	for _, a := range args {
		if !a.set {
			return fmt.Errorf("%w: %s missing", errInvalidArgument, a.name)
		}
	}
	return nil
}

// sentinelCodes maps the errors above, and the controller's, to codes.
// The first match wins: an error that wraps one of this package's
// sentinels and a cause (a failed probe wraps errFailedPrecondition and
// the API server's error) gets the sentinel's code.
var sentinelCodes = []struct {
	err  error
	code codes.Code
}{
	{errInvalidArgument, codes.InvalidArgument},
	{errNotFound, codes.NotFound},
	{errAlreadyExists, codes.AlreadyExists},
	{errOutOfRange, codes.OutOfRange},
	{errFailedPrecondition, codes.FailedPrecondition},
	{errAborted, codes.Aborted},
	{contract.ErrAttachedElsewhere, codes.FailedPrecondition},
	{contract.ErrTooManyAttachments, codes.FailedPrecondition},
	{context.DeadlineExceeded, codes.DeadlineExceeded},
	{context.Canceled, codes.Canceled},
}

// toStatus turns a handler's error into the gRPC status the CO acts on.
// The message is the whole wrapped error, so it says what failed and
// where. API server errors that no handler interpreted keep their
// meaning: a missing object is NOT_FOUND, a conflict that outlived the
// retries is ABORTED (the CO retries), an overloaded or unreachable
// server UNAVAILABLE; anything else is INTERNAL, never UNKNOWN.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(codeOf(err), err.Error())
}

func codeOf(err error) codes.Code {
	for _, s := range sentinelCodes {
		if errors.Is(err, s.err) {
			return s.code
		}
	}
	switch {
	case kerrors.IsNotFound(err):
		return codes.NotFound
	case kerrors.IsConflict(err), kerrors.IsAlreadyExists(err):
		return codes.Aborted
	case kerrors.IsInvalid(err), kerrors.IsBadRequest(err):
		// The API server's schema refused what a handler built from the
		// request, e.g. a size beyond what a Quantity holds.
		return codes.InvalidArgument
	case kerrors.IsServerTimeout(err), kerrors.IsTimeout(err), kerrors.IsTooManyRequests(err),
		kerrors.IsServiceUnavailable(err), meta.IsNoMatchError(err):
		// NoMatch: the CRD is not installed (yet); Probe says so too.
		return codes.Unavailable
	}
	return codes.Internal
}
