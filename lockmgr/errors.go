package lockmgr

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Code is the stable number of a failure class. Codes are part of the API:
// the gRPC service and the CLI's exit status map them 1:1, so a value never
// changes meaning once released.
type Code int

// The failure classes of DESIGN.md ("Errors"). Every code is also the
// vmlock CLI's exit status for its failures.
const (
	CodeOK              Code = 0
	CodeInternal        Code = 1 // a bug or an unexpected system error
	CodeInvalidArgument Code = 2 // malformed input; nothing was changed
	CodeBusy            Code = 3 // the resource is held by someone else (see BusyError)
	CodeStaleState      Code = 4 // a state string's token is no longer current (see StaleStateError)
	CodePermission      Code = 5 // the caller may not act on this object
	CodeTimeout         Code = 6 // the deadline passed; nothing is left half-done
	CodeNotRegistered   Code = 7 // unknown object, or the object is in the wrong state for this call
	CodeUnsupported     Code = 8 // the driver cannot do this
	CodeNotHeld         Code = 9 // release or inquire of something not held
)

var codeNames = [...]string{
	CodeOK:              "ok",
	CodeInternal:        "internal",
	CodeInvalidArgument: "invalid argument",
	CodeBusy:            "busy",
	CodeStaleState:      "stale state",
	CodePermission:      "permission denied",
	CodeTimeout:         "timeout",
	CodeNotRegistered:   "not registered",
	CodeUnsupported:     "unsupported",
	CodeNotHeld:         "not held",
}

func (c Code) String() string {
	if c >= 0 && int(c) < len(codeNames) {
		return codeNames[c]
	}
	return fmt.Sprintf("code(%d)", int(c))
}

// Error is the error type for every failure class without extra structure.
// Busy and stale-state failures have their own types carrying the holder and
// the tokens. All three match the sentinels below with errors.Is by code, so
// callers write errors.Is(err, lockmgr.ErrBusy) whatever the concrete type.
type Error struct {
	Code     Code
	Resource string // the resource concerned, if any (Resource.String form)
	Msg      string // what went wrong, for a human
	Err      error  // the underlying cause, if any
}

func (e *Error) Error() string {
	var b strings.Builder
	if e.Resource != "" {
		b.WriteString(e.Resource)
		b.WriteString(": ")
	}
	if e.Msg != "" {
		b.WriteString(e.Msg)
	} else {
		b.WriteString(e.Code.String())
	}
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

func (e *Error) Unwrap() error { return e.Err }

// Is reports whether target is a sentinel of the same code.
func (e *Error) Is(target error) bool { return isCode(target, e.Code) }

// ErrorCode returns the error's class.
func (e *Error) ErrorCode() Code { return e.Code }

// Sentinels for errors.Is. They are never returned themselves.
var (
	ErrInternal        = &Error{Code: CodeInternal}
	ErrInvalidArgument = &Error{Code: CodeInvalidArgument}
	ErrBusy            = &Error{Code: CodeBusy}
	ErrStaleState      = &Error{Code: CodeStaleState}
	ErrPermission      = &Error{Code: CodePermission}
	ErrTimeout         = &Error{Code: CodeTimeout}
	ErrNotRegistered   = &Error{Code: CodeNotRegistered}
	ErrUnsupported     = &Error{Code: CodeUnsupported}
	ErrNotHeld         = &Error{Code: CodeNotHeld}
)

func isCode(target error, c Code) bool {
	t, ok := target.(*Error)
	return ok && t.Code == c && t.Msg == "" && t.Resource == "" && t.Err == nil
}

// Errorf returns an *Error of class c.
func Errorf(c Code, format string, args ...any) error {
	return &Error{Code: c, Msg: fmt.Sprintf(format, args...)}
}

// invalid is shorthand for the most common error of this package.
func invalid(format string, args ...any) error { return Errorf(CodeInvalidArgument, format, args...) }

// CodeOf returns the class of err: CodeOK for nil, the code of any error in
// the chain that has one, CodeTimeout for context deadline errors, and
// CodeInternal otherwise.
func CodeOf(err error) Code {
	if err == nil {
		return CodeOK
	}
	var c interface{ ErrorCode() Code }
	if errors.As(err, &c) {
		return c.ErrorCode()
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return CodeTimeout
	}
	return CodeInternal
}

// Holder describes who holds a resource, for busy errors and the lock
// monitor. Fields unknown to the reporter are zero; Foreign is set when the
// lock is held outside vmlock's knowledge (for example virtlockd, or another
// program's fcntl lock), in which case only PID may be known.
type Holder struct {
	Name    string    `json:"name,omitempty"`
	UUID    string    `json:"uuid,omitempty"`
	PID     int       `json:"pid,omitempty"`
	Host    string    `json:"host,omitempty"`
	Mode    Mode      `json:"mode"`
	Since   time.Time `json:"since,omitzero"`
	Foreign bool      `json:"foreign,omitempty"`
}

// BusyError says that a resource could not be granted because someone holds
// it in a conflicting mode. Holder names them as precisely as is known.
type BusyError struct {
	Resource Resource
	Holder   Holder
}

func (e *BusyError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s is locked %s", e.Resource, e.Holder.Mode.Adverb())
	h := e.Holder
	switch {
	case h.UUID != "":
		if h.Name != "" {
			fmt.Fprintf(&b, " by vm %q (uuid %s", h.Name, h.UUID)
		} else {
			fmt.Fprintf(&b, " by vm (uuid %s", h.UUID)
		}
		if h.PID != 0 {
			fmt.Fprintf(&b, ", pid %d", h.PID)
		}
		if h.Host != "" {
			fmt.Fprintf(&b, ", host %s", h.Host)
		}
		b.WriteString(")")
	case h.PID > 0:
		fmt.Fprintf(&b, " by another program (pid %d", h.PID)
		if h.Host != "" {
			fmt.Fprintf(&b, ", host %s", h.Host)
		}
		b.WriteString(")")
	default:
		b.WriteString(" by a process outside this vmlockd (another host, or an OFD lock of another program)")
	}
	if !h.Since.IsZero() {
		b.WriteString(" since ")
		b.WriteString(formatSince(h.Since))
	}
	return b.String()
}

// formatSince prints a clock time for today's locks and a date otherwise, as
// operators read `ls -l`.
func formatSince(t time.Time) string {
	t = t.Local()
	now := time.Now()
	if y, m, d := now.Date(); t.Year() == y && t.Month() == m && t.Day() == d {
		return t.Format("15:04:05")
	}
	return t.Format("2006-01-02 15:04:05")
}

func (e *BusyError) ErrorCode() Code      { return CodeBusy }
func (e *BusyError) Is(target error) bool { return isCode(target, CodeBusy) }

// StaleStateError says that a state string carried a token that is no longer
// the resource's current one: someone else was granted it since.
type StaleStateError struct {
	Resource Resource
	Want     uint64 // the token in the state string
	Current  uint64 // the resource's current token (0 if unknown)
	// Reason, if set, says why Want is refused although it is Current: the
	// driver cannot trust its record of the resource (a crash of the host
	// may have taken back a later grant).
	Reason string
}

func (e *StaleStateError) Error() string {
	if e.Reason != "" {
		return fmt.Sprintf("%s: stale state: token %d cannot be trusted to be current: %s", e.Resource, e.Want, e.Reason)
	}
	if e.Current == 0 {
		return fmt.Sprintf("%s: stale state: token %d is no longer current (the resource was granted to someone else since)", e.Resource, e.Want)
	}
	return fmt.Sprintf("%s: stale state: token %d is no longer current (now %d: the resource was granted to someone else since)", e.Resource, e.Want, e.Current)
}

func (e *StaleStateError) ErrorCode() Code      { return CodeStaleState }
func (e *StaleStateError) Is(target error) bool { return isCode(target, CodeStaleState) }
