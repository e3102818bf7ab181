package virtlockd

import (
	"fmt"
	"strconv"

	"github.com/vmlock/vmlock/lockmgr"
)

// ErrorCode is libvirt's virErrorNumber.
type ErrorCode int32

// The libvirt error codes this protocol uses.
const (
	CodeInternalError     ErrorCode = 1  // VIR_ERR_INTERNAL_ERROR
	CodeInvalidArg        ErrorCode = 8  // VIR_ERR_INVALID_ARG (unknown flags)
	CodeOperationDenied   ErrorCode = 29 // VIR_ERR_OPERATION_DENIED (restricted connection)
	CodeSystemError       ErrorCode = 38 // VIR_ERR_SYSTEM_ERROR (a failed system call)
	CodeRPC               ErrorCode = 39 // VIR_ERR_RPC (protocol errors)
	CodeOperationInvalid  ErrorCode = 55 // VIR_ERR_OPERATION_INVALID (not registered)
	CodeConfigUnsupported ErrorCode = 67 // VIR_ERR_CONFIG_UNSUPPORTED
	CodeOperationTimeout  ErrorCode = 68 // VIR_ERR_OPERATION_TIMEOUT
	CodeResourceBusy      ErrorCode = 87 // VIR_ERR_RESOURCE_BUSY
)

// ErrorDomain is libvirt's virErrorDomain: which part of libvirt raised an
// error.
type ErrorDomain int32

// The libvirt error domains this protocol uses.
const (
	DomainRPC       ErrorDomain = 7  // VIR_FROM_RPC: the RPC layer and virtlockd's dispatcher
	DomainLocking   ErrorDomain = 42 // VIR_FROM_LOCKING: the lock plugin in libvirtd
	DomainLockspace ErrorDomain = 51 // VIR_FROM_LOCKSPACE: the lockspaces themselves
)

// LevelError is virErrorLevel VIR_ERR_ERROR.
const LevelError int32 = 2

// msgInfo is libvirt's message format for each code: what libvirt puts
// before the detail.
func (c ErrorCode) msgInfo() string {
	switch c {
	case CodeInternalError:
		return "internal error: %s"
	case CodeInvalidArg:
		return "invalid argument: %s"
	case CodeOperationDenied:
		return "operation forbidden: %s"
	case CodeOperationInvalid:
		return "Requested operation is not valid: %s"
	case CodeConfigUnsupported:
		return "unsupported configuration: %s"
	case CodeOperationTimeout:
		return "Timed out during operation: %s"
	case CodeResourceBusy:
		return "resource busy: %s"
	}
	return "%s" // system and RPC errors carry their detail alone
}

// RemoteDomain is the unused "dom" member of libvirt's error body, kept so
// that any body decodes and re-encodes byte for byte.
type RemoteDomain struct {
	Name string
	UUID [16]byte
	ID   int32
}

// RemoteNetwork is the unused "net" member of libvirt's error body.
type RemoteNetwork struct {
	Name string
	UUID [16]byte
}

// RemoteError is the body of an error reply, laid out as libvirt's
// virNetMessageError (virErrorPtr on the wire). Optional members are nil
// when absent. It is the error the Client returns for a refused call.
type RemoteError struct {
	Code             ErrorCode
	Domain           ErrorDomain
	Message          *string
	Level            int32
	Dom              *RemoteDomain
	Str1, Str2, Str3 *string
	Int1, Int2       int32
	Net              *RemoteNetwork
}

// newRemoteError builds an error as libvirt's virReportError does: the
// message is the code's prefix and the detail.
func newRemoteError(code ErrorCode, domain ErrorDomain, detail string) *RemoteError {
	info := code.msgInfo()
	msg := fmt.Sprintf(info, detail)
	return &RemoteError{Code: code, Domain: domain, Message: &msg, Level: LevelError,
		Str1: &info, Str2: &detail, Int1: -1, Int2: -1}
}

// Error returns the message, as libvirt prints it after "error: ".
func (e *RemoteError) Error() string {
	if e.Message != nil {
		return *e.Message
	}
	return "libvirt error code " + strconv.Itoa(int(e.Code)) + " (domain " + strconv.Itoa(int(e.Domain)) + ")"
}

// ErrorCode maps the libvirt code onto vmlock's failure classes, so that
// lockmgr.CodeOf and the CLI's exit status work on errors from a lock daemon.
func (e *RemoteError) ErrorCode() lockmgr.Code {
	switch e.Code {
	case CodeResourceBusy:
		return lockmgr.CodeBusy
	case CodeOperationDenied:
		return lockmgr.CodePermission
	case CodeOperationInvalid:
		return lockmgr.CodeNotRegistered
	case CodeInvalidArg:
		return lockmgr.CodeInvalidArgument
	case CodeOperationTimeout:
		return lockmgr.CodeTimeout
	case CodeConfigUnsupported:
		return lockmgr.CodeUnsupported
	}
	return lockmgr.CodeInternal
}

func (e *RemoteError) check() error {
	for _, s := range [...]struct {
		f string
		p *string
	}{{"message", e.Message}, {"str1", e.Str1}, {"str2", e.Str2}, {"str3", e.Str3}} {
		if s.p != nil {
			if err := checkString("error "+s.f, *s.p, ErrorStringMax); err != nil {
				return err
			}
		}
	}
	if e.Dom != nil {
		if err := checkString("error dom.name", e.Dom.Name, ErrorStringMax); err != nil {
			return err
		}
	}
	if e.Net != nil {
		if err := checkString("error net.name", e.Net.Name, ErrorStringMax); err != nil {
			return err
		}
	}
	return nil
}

func (e *RemoteError) encode(en *encoder) {
	en.i32(int32(e.Code))
	en.i32(int32(e.Domain))
	en.optStr(e.Message)
	en.i32(e.Level)
	if e.Dom == nil {
		en.u32(0)
	} else {
		en.u32(1)
		en.str(e.Dom.Name)
		en.uuid(e.Dom.UUID)
		en.i32(e.Dom.ID)
	}
	en.optStr(e.Str1)
	en.optStr(e.Str2)
	en.optStr(e.Str3)
	en.i32(e.Int1)
	en.i32(e.Int2)
	if e.Net == nil {
		en.u32(0)
	} else {
		en.u32(1)
		en.str(e.Net.Name)
		en.uuid(e.Net.UUID)
	}
}

// AppendRemoteError appends the XDR encoding of e (an error reply's payload).
func AppendRemoteError(dst []byte, e *RemoteError) ([]byte, error) {
	if err := e.check(); err != nil {
		return dst, err
	}
	en := encoder{b: dst}
	e.encode(&en)
	return en.b, nil
}

// DecodeRemoteError decodes an error reply's payload. Like DecodeArgs it
// accepts only the exact canonical encoding; failures are *DecodeError.
func DecodeRemoteError(payload []byte) (*RemoteError, error) {
	d := decoder{b: payload}
	e := new(RemoteError)
	var err error
	var v int32
	if v, err = d.i32("error.code"); err != nil {
		return nil, err
	}
	e.Code = ErrorCode(v)
	if v, err = d.i32("error.domain"); err != nil {
		return nil, err
	}
	e.Domain = ErrorDomain(v)
	if e.Message, err = d.optStr("error.message", ErrorStringMax); err != nil {
		return nil, err
	}
	if e.Level, err = d.i32("error.level"); err != nil {
		return nil, err
	}
	if ok, err := d.present("error.dom"); err != nil {
		return nil, err
	} else if ok {
		dom := new(RemoteDomain)
		if dom.Name, err = d.str("error.dom.name", ErrorStringMax); err != nil {
			return nil, err
		}
		if dom.UUID, err = d.uuid("error.dom.uuid"); err != nil {
			return nil, err
		}
		if dom.ID, err = d.i32("error.dom.id"); err != nil {
			return nil, err
		}
		e.Dom = dom
	}
	if e.Str1, err = d.optStr("error.str1", ErrorStringMax); err != nil {
		return nil, err
	}
	if e.Str2, err = d.optStr("error.str2", ErrorStringMax); err != nil {
		return nil, err
	}
	if e.Str3, err = d.optStr("error.str3", ErrorStringMax); err != nil {
		return nil, err
	}
	if e.Int1, err = d.i32("error.int1"); err != nil {
		return nil, err
	}
	if e.Int2, err = d.i32("error.int2"); err != nil {
		return nil, err
	}
	if ok, err := d.present("error.net"); err != nil {
		return nil, err
	} else if ok {
		net := new(RemoteNetwork)
		if net.Name, err = d.str("error.net.name", ErrorStringMax); err != nil {
			return nil, err
		}
		if net.UUID, err = d.uuid("error.net.uuid"); err != nil {
			return nil, err
		}
		e.Net = net
	}
	if err := d.end(); err != nil {
		return nil, err
	}
	return e, nil
}
