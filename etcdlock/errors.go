package etcdlock

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmlock/vmlock/lockmgr"
)

// ErrFenced is wrapped by the errors of calls made while the host's session
// is lost (after OnFence, until a new session is established). Their class
// is lockmgr.CodeTimeout: the call may succeed later.
var ErrFenced = errors.New("this host's etcd lease is lost (the host fenced itself); retry once it has reconnected to etcd")

// errClosed is wrapped by the errors of calls made after Close.
var errClosed = errors.New("the etcd driver is closed")

func fencedError() error {
	return &lockmgr.Error{Code: lockmgr.CodeTimeout, Msg: "etcd driver", Err: ErrFenced}
}

func closedError() error {
	return &lockmgr.Error{Code: lockmgr.CodeInternal, Msg: "etcd driver", Err: errClosed}
}

// grpcCode returns the gRPC code of an etcd client error, or codes.Unknown.
func grpcCode(err error) codes.Code {
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return ee.Code()
	}
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	return codes.Unknown
}

// isTimeout reports whether err means that etcd did not answer (in time).
func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return true
	}
	switch grpcCode(err) {
	case codes.DeadlineExceeded, codes.Canceled, codes.Unavailable:
		return true
	}
	return errors.Is(err, rpctypes.ErrNoLeader) || errors.Is(err, rpctypes.ErrTimeout) ||
		errors.Is(err, rpctypes.ErrTimeoutDueToLeaderFail) || errors.Is(err, rpctypes.ErrTimeoutDueToConnectionLost)
}

// definite reports whether err certainly means that a write was not
// applied (the server refused it), as opposed to an error after which the
// write may or may not have been committed.
func definite(err error) bool {
	switch grpcCode(err) {
	case codes.InvalidArgument, codes.FailedPrecondition, codes.NotFound, codes.PermissionDenied,
		codes.ResourceExhausted, codes.OutOfRange, codes.Unauthenticated, codes.AlreadyExists:
		return true
	}
	return false
}

func isLeaseNotFound(err error) bool {
	return errors.Is(err, rpctypes.ErrLeaseNotFound) || errors.Is(err, rpctypes.ErrGRPCLeaseNotFound)
}

// opError wraps an etcd client error in the lockmgr error class it means.
func opError(what string, err error) error {
	if errors.Is(err, errClosed) {
		return &lockmgr.Error{Code: lockmgr.CodeInternal, Msg: what, Err: err}
	}
	if isTimeout(err) {
		return &lockmgr.Error{Code: lockmgr.CodeTimeout, Msg: what + ": etcd did not answer in time", Err: err}
	}
	if grpcCode(err) == codes.PermissionDenied || grpcCode(err) == codes.Unauthenticated {
		return &lockmgr.Error{Code: lockmgr.CodePermission, Msg: what + ": etcd refused the credentials", Err: err}
	}
	return &lockmgr.Error{Code: lockmgr.CodeInternal, Msg: what, Err: fmt.Errorf("etcd: %w", err)}
}
