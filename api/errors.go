// Package api is vmlockd's native API: the gRPC service of package vmlockpb
// served on a unix socket, the mapping of lockmgr errors onto gRPC statuses
// (both ways, so that a client gets back the very error the daemon had,
// holder included), and a Go client.
package api

import (
	"errors"
	"strconv"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vmlock/vmlock/lockmgr"
)

// ErrorDomain is the domain of the ErrorInfo detail of every vmlock error.
const ErrorDomain = "vmlock.io"

// grpcCodes maps each lockmgr code to one gRPC code, 1:1.
var grpcCodes = map[lockmgr.Code]codes.Code{
	lockmgr.CodeInternal:        codes.Internal,
	lockmgr.CodeInvalidArgument: codes.InvalidArgument,
	lockmgr.CodeBusy:            codes.Aborted,
	lockmgr.CodeStaleState:      codes.FailedPrecondition,
	lockmgr.CodePermission:      codes.PermissionDenied,
	lockmgr.CodeTimeout:         codes.DeadlineExceeded,
	lockmgr.CodeNotRegistered:   codes.NotFound,
	lockmgr.CodeUnsupported:     codes.Unimplemented,
	lockmgr.CodeNotHeld:         codes.OutOfRange,
}

// reasons are the ErrorInfo reasons, stable API strings.
var reasons = map[lockmgr.Code]string{
	lockmgr.CodeInternal:        "INTERNAL",
	lockmgr.CodeInvalidArgument: "INVALID_ARGUMENT",
	lockmgr.CodeBusy:            "BUSY",
	lockmgr.CodeStaleState:      "STALE_STATE",
	lockmgr.CodePermission:      "PERMISSION_DENIED",
	lockmgr.CodeTimeout:         "TIMEOUT",
	lockmgr.CodeNotRegistered:   "NOT_REGISTERED",
	lockmgr.CodeUnsupported:     "UNSUPPORTED",
	lockmgr.CodeNotHeld:         "NOT_HELD",
}

// ToStatus turns a lockmgr error into the gRPC error the server returns.
// Nil stays nil.
func ToStatus(err error) error {
	if err == nil {
		return nil
	}
	code := lockmgr.CodeOf(err)
	md := map[string]string{}
	var be *lockmgr.BusyError
	var se *lockmgr.StaleStateError
	var le *lockmgr.Error
	switch {
	case errors.As(err, &be):
		putResource(md, be.Resource)
		h := be.Holder
		md["holder_name"], md["holder_uuid"], md["holder_host"] = h.Name, h.UUID, h.Host
		md["holder_pid"], md["holder_mode"] = strconv.Itoa(h.PID), h.Mode.String()
		md["holder_foreign"] = strconv.FormatBool(h.Foreign)
		if !h.Since.IsZero() {
			md["holder_since"] = h.Since.Format(time.RFC3339Nano)
		}
	case errors.As(err, &se):
		putResource(md, se.Resource)
		md["want"], md["current"] = strconv.FormatUint(se.Want, 10), strconv.FormatUint(se.Current, 10)
	case errors.As(err, &le):
		md["resource"] = le.Resource
	}
	st := status.New(grpcCodes[code], err.Error())
	if d, derr := st.WithDetails(&errdetails.ErrorInfo{Domain: ErrorDomain, Reason: reasons[code], Metadata: md}); derr == nil {
		st = d
	}
	return st.Err()
}

func putResource(md map[string]string, r lockmgr.Resource) {
	md["resource_type"], md["resource_name"], md["resource_mode"] = string(r.Type), r.Name, r.Mode.String()
}

func getResource(md map[string]string) lockmgr.Resource {
	m, _ := lockmgr.ParseMode(md["resource_mode"])
	return lockmgr.Resource{Type: lockmgr.ResourceType(md["resource_type"]), Name: md["resource_name"], Mode: m}
}

// FromStatus turns an error from a gRPC call back into the lockmgr error the
// daemon returned: a *lockmgr.BusyError with its holder, a
// *lockmgr.StaleStateError with its tokens (found with errors.As, and
// reading as the daemon's whole message where it wrapped them), or a
// *lockmgr.Error of the right code. An error that is not a vmlock status (the daemon is unreachable, the
// call timed out on the client, the request was over gRPC's size limit)
// becomes a CodeTimeout, CodeInternal or CodeInvalidArgument error that
// says so.
func FromStatus(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return &lockmgr.Error{Code: lockmgr.CodeInternal, Msg: "talking to vmlockd", Err: err}
	}
	for _, d := range st.Details() {
		info, ok := d.(*errdetails.ErrorInfo)
		if !ok || info.Domain != ErrorDomain {
			continue
		}
		md := info.Metadata
		for c, r := range reasons {
			if r != info.Reason {
				continue
			}
			_, structured := md["resource_type"]
			switch {
			case c == lockmgr.CodeBusy && structured:
				pid, _ := strconv.Atoi(md["holder_pid"])
				mode, _ := lockmgr.ParseMode(md["holder_mode"])
				since, _ := time.Parse(time.RFC3339Nano, md["holder_since"])
				foreign, _ := strconv.ParseBool(md["holder_foreign"])
				return withMessage(st.Message(), &lockmgr.BusyError{Resource: getResource(md), Holder: lockmgr.Holder{
					Name: md["holder_name"], UUID: md["holder_uuid"], PID: pid, Host: md["holder_host"],
					Mode: mode, Since: since, Foreign: foreign}})
			case c == lockmgr.CodeStaleState && structured:
				want, _ := strconv.ParseUint(md["want"], 10, 64)
				cur, _ := strconv.ParseUint(md["current"], 10, 64)
				return withMessage(st.Message(), &lockmgr.StaleStateError{Resource: getResource(md), Want: want, Current: cur})
			}
			return &lockmgr.Error{Code: c, Msg: st.Message()}
		}
	}
	switch st.Code() {
	case codes.DeadlineExceeded, codes.Canceled:
		return &lockmgr.Error{Code: lockmgr.CodeTimeout, Msg: "vmlockd did not answer in time", Err: err}
	case codes.Unavailable:
		return &lockmgr.Error{Code: lockmgr.CodeInternal, Msg: "vmlockd is unavailable", Err: err}
	case codes.PermissionDenied:
		return &lockmgr.Error{Code: lockmgr.CodePermission, Msg: st.Message()}
	case codes.ResourceExhausted:
		// gRPC's own refusal of a message over its size limit.
		return &lockmgr.Error{Code: lockmgr.CodeInvalidArgument, Msg: "the request is too large for vmlockd (" + st.Message() + ")"}
	}
	return &lockmgr.Error{Code: lockmgr.CodeInternal, Msg: st.Message()}
}

// messageError is a structured error the daemon wrapped with context ("the
// copy cannot start: ..."): it reads as the daemon's whole message, and
// unwraps to the structured error.
type messageError struct {
	msg string
	err error
}

func (e *messageError) Error() string { return e.msg }
func (e *messageError) Unwrap() error { return e.err }

// withMessage returns err, reading as msg if that is not what err says.
func withMessage(msg string, err error) error {
	if msg == "" || msg == err.Error() {
		return err
	}
	return &messageError{msg: msg, err: err}
}
