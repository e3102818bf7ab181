package virtlockd

import (
	"encoding/binary"
	"fmt"
	"strconv"
)

// Protocol constants of libvirt's RPC layer and of the lockspace program.
const (
	// Program is the lockspace program's number.
	Program uint32 = 0x0EA7BEEF
	// ProgramVersion is the only version of the program.
	ProgramVersion uint32 = 1

	// HeaderSize is the size of the header after the length word.
	HeaderSize = 24
	// MinMessageSize is the smallest valid length word: itself and a header.
	MinMessageSize = 4 + HeaderSize
	// MaxMessageSize is the largest valid length word (libvirt's
	// VIR_NET_MESSAGE_MAX plus the length word itself).
	MaxMessageSize = 4 + 33554432

	// StringMax bounds every string of the lockspace program
	// (VIR_LOCK_SPACE_PROTOCOL_STRING_MAX).
	StringMax = 65536
	// ErrorStringMax bounds the strings of an error body
	// (VIR_NET_MESSAGE_STRING_MAX).
	ErrorStringMax = 4194304

	// MaxCallSize is the largest call of the lockspace program: a header and
	// two strings of StringMax bytes and a u32. A server needs no bigger
	// buffer; bigger calls are skipped and answered with an error.
	MaxCallSize = MinMessageSize + 4 + StringMax + 4 + StringMax + 4
)

// Flags of ACQUIRE_RESOURCE. No other procedure has flags.
const (
	AcquireShared     uint32 = 1
	AcquireAutoCreate uint32 = 2
)

// Procedure is a procedure number of the lockspace program.
type Procedure int32

// The procedures of the lockspace program. Every one returns void.
const (
	ProcRegister        Procedure = 1
	ProcRestrict        Procedure = 2
	ProcNew             Procedure = 3
	ProcCreateResource  Procedure = 4
	ProcDeleteResource  Procedure = 5
	ProcAcquireResource Procedure = 6
	ProcReleaseResource Procedure = 7
	ProcCreateLockspace Procedure = 8
)

func (p Procedure) valid() bool { return p >= ProcRegister && p <= ProcCreateLockspace }

func (p Procedure) String() string {
	switch p {
	case ProcRegister:
		return "REGISTER"
	case ProcRestrict:
		return "RESTRICT"
	case ProcNew:
		return "NEW"
	case ProcCreateResource:
		return "CREATE_RESOURCE"
	case ProcDeleteResource:
		return "DELETE_RESOURCE"
	case ProcAcquireResource:
		return "ACQUIRE_RESOURCE"
	case ProcReleaseResource:
		return "RELEASE_RESOURCE"
	case ProcCreateLockspace:
		return "CREATE_LOCKSPACE"
	}
	return "procedure(" + strconv.Itoa(int(p)) + ")"
}

// MessageType is the type field of a header.
type MessageType int32

// Message types (virNetMessageType).
const (
	TypeCall         MessageType = 0
	TypeReply        MessageType = 1
	TypeMessage      MessageType = 2
	TypeStream       MessageType = 3
	TypeCallWithFDs  MessageType = 4
	TypeReplyWithFDs MessageType = 5
	TypeStreamHole   MessageType = 6
)

// Status is the status field of a header.
type Status int32

// Statuses (virNetMessageStatus). A call is always StatusOK.
const (
	StatusOK       Status = 0
	StatusError    Status = 1
	StatusContinue Status = 2
)

// Header is the fixed part of every message after its length word.
type Header struct {
	Program   uint32
	Version   uint32
	Procedure Procedure
	Type      MessageType
	Serial    uint32
	Status    Status
}

func (h Header) encode(e *encoder) {
	e.u32(h.Program)
	e.u32(h.Version)
	e.i32(int32(h.Procedure))
	e.i32(int32(h.Type))
	e.u32(h.Serial)
	e.i32(int32(h.Status))
}

func decodeHeader(b []byte) Header {
	return Header{
		Program:   binary.BigEndian.Uint32(b[0:]),
		Version:   binary.BigEndian.Uint32(b[4:]),
		Procedure: Procedure(binary.BigEndian.Uint32(b[8:])),
		Type:      MessageType(binary.BigEndian.Uint32(b[12:])),
		Serial:    binary.BigEndian.Uint32(b[16:]),
		Status:    Status(binary.BigEndian.Uint32(b[20:])),
	}
}

// AppendMessage appends a whole message (length word, header, payload) to
// dst. It fails only if the message would exceed MaxMessageSize.
func AppendMessage(dst []byte, h Header, payload []byte) ([]byte, error) {
	n := MinMessageSize + len(payload)
	if n > MaxMessageSize {
		return dst, fmt.Errorf("virtlockd protocol: encoding a message of %d bytes: %w", n, ErrMessageSize)
	}
	e := encoder{b: dst}
	e.u32(uint32(n))
	h.encode(&e)
	e.b = append(e.b, payload...)
	return e.b, nil
}

// Owner identifies a lock owner: a domain and the process that uses its
// resources (QEMU).
type Owner struct {
	UUID [16]byte
	Name string // string<StringMax>
	ID   uint32 // the domain id; 0 is refused by REGISTER
	PID  uint32 // the process whose locks these are
}

// Args is the arguments of one procedure. The concrete types are the
// *XxxArgs structs of this package.
type Args interface {
	Procedure() Procedure
	check() error
	encode(*encoder)
	decode(*decoder) error
}

// RegisterArgs are REGISTER's arguments.
type RegisterArgs struct {
	Owner Owner
	Flags uint32
}

// RestrictArgs are RESTRICT's arguments.
type RestrictArgs struct{ Flags uint32 }

// NewArgs are NEW's arguments.
type NewArgs struct {
	Path  string
	Flags uint32
}

// CreateResourceArgs are CREATE_RESOURCE's arguments.
type CreateResourceArgs struct {
	Path, Name string
	Flags      uint32
}

// DeleteResourceArgs are DELETE_RESOURCE's arguments.
type DeleteResourceArgs struct {
	Path, Name string
	Flags      uint32
}

// AcquireResourceArgs are ACQUIRE_RESOURCE's arguments; Flags may hold
// AcquireShared and AcquireAutoCreate.
type AcquireResourceArgs struct {
	Path, Name string
	Flags      uint32
}

// ReleaseResourceArgs are RELEASE_RESOURCE's arguments.
type ReleaseResourceArgs struct {
	Path, Name string
	Flags      uint32
}

// CreateLockspaceArgs are CREATE_LOCKSPACE's arguments (it has no flags).
type CreateLockspaceArgs struct{ Path string }

func (*RegisterArgs) Procedure() Procedure        { return ProcRegister }
func (*RestrictArgs) Procedure() Procedure        { return ProcRestrict }
func (*NewArgs) Procedure() Procedure             { return ProcNew }
func (*CreateResourceArgs) Procedure() Procedure  { return ProcCreateResource }
func (*DeleteResourceArgs) Procedure() Procedure  { return ProcDeleteResource }
func (*AcquireResourceArgs) Procedure() Procedure { return ProcAcquireResource }
func (*ReleaseResourceArgs) Procedure() Procedure { return ProcReleaseResource }
func (*CreateLockspaceArgs) Procedure() Procedure { return ProcCreateLockspace }

func (a *RegisterArgs) check() error { return checkString("owner.name", a.Owner.Name, StringMax) }
func (a *RestrictArgs) check() error { return nil }
func (a *NewArgs) check() error      { return checkString("path", a.Path, StringMax) }
func (a *CreateResourceArgs) check() error {
	return checkPathName(a.Path, a.Name)
}
func (a *DeleteResourceArgs) check() error  { return checkPathName(a.Path, a.Name) }
func (a *AcquireResourceArgs) check() error { return checkPathName(a.Path, a.Name) }
func (a *ReleaseResourceArgs) check() error { return checkPathName(a.Path, a.Name) }
func (a *CreateLockspaceArgs) check() error { return checkString("path", a.Path, StringMax) }

func checkPathName(path, name string) error {
	if err := checkString("path", path, StringMax); err != nil {
		return err
	}
	return checkString("name", name, StringMax)
}

func (a *RegisterArgs) encode(e *encoder) {
	e.uuid(a.Owner.UUID)
	e.str(a.Owner.Name)
	e.u32(a.Owner.ID)
	e.u32(a.Owner.PID)
	e.u32(a.Flags)
}

func (a *RestrictArgs) encode(e *encoder) { e.u32(a.Flags) }
func (a *NewArgs) encode(e *encoder)      { e.str(a.Path); e.u32(a.Flags) }
func (a *CreateResourceArgs) encode(e *encoder) {
	encodePathName(e, a.Path, a.Name, a.Flags)
}
func (a *DeleteResourceArgs) encode(e *encoder) { encodePathName(e, a.Path, a.Name, a.Flags) }
func (a *AcquireResourceArgs) encode(e *encoder) {
	encodePathName(e, a.Path, a.Name, a.Flags)
}
func (a *ReleaseResourceArgs) encode(e *encoder) {
	encodePathName(e, a.Path, a.Name, a.Flags)
}
func (a *CreateLockspaceArgs) encode(e *encoder) { e.str(a.Path) }

func encodePathName(e *encoder, path, name string, flags uint32) {
	e.str(path)
	e.str(name)
	e.u32(flags)
}

func (a *RegisterArgs) decode(d *decoder) (err error) {
	if a.Owner.UUID, err = d.uuid("owner.uuid"); err != nil {
		return err
	}
	if a.Owner.Name, err = d.str("owner.name", StringMax); err != nil {
		return err
	}
	if a.Owner.ID, err = d.u32("owner.id"); err != nil {
		return err
	}
	if a.Owner.PID, err = d.u32("owner.pid"); err != nil {
		return err
	}
	a.Flags, err = d.u32("flags")
	return err
}

func (a *RestrictArgs) decode(d *decoder) (err error) {
	a.Flags, err = d.u32("flags")
	return err
}

func (a *NewArgs) decode(d *decoder) (err error) {
	if a.Path, err = d.str("path", StringMax); err != nil {
		return err
	}
	a.Flags, err = d.u32("flags")
	return err
}

func (a *CreateResourceArgs) decode(d *decoder) error {
	return decodePathName(d, &a.Path, &a.Name, &a.Flags)
}
func (a *DeleteResourceArgs) decode(d *decoder) error {
	return decodePathName(d, &a.Path, &a.Name, &a.Flags)
}
func (a *AcquireResourceArgs) decode(d *decoder) error {
	return decodePathName(d, &a.Path, &a.Name, &a.Flags)
}
func (a *ReleaseResourceArgs) decode(d *decoder) error {
	return decodePathName(d, &a.Path, &a.Name, &a.Flags)
}

func (a *CreateLockspaceArgs) decode(d *decoder) (err error) {
	a.Path, err = d.str("path", StringMax)
	return err
}

func decodePathName(d *decoder, path, name *string, flags *uint32) (err error) {
	if *path, err = d.str("path", StringMax); err != nil {
		return err
	}
	if *name, err = d.str("name", StringMax); err != nil {
		return err
	}
	*flags, err = d.u32("flags")
	return err
}

// NewArgsFor returns zero arguments of the procedure p, or a *DecodeError
// wrapping ErrUnknownProcedure.
func NewArgsFor(p Procedure) (Args, error) {
	switch p {
	case ProcRegister:
		return new(RegisterArgs), nil
	case ProcRestrict:
		return new(RestrictArgs), nil
	case ProcNew:
		return new(NewArgs), nil
	case ProcCreateResource:
		return new(CreateResourceArgs), nil
	case ProcDeleteResource:
		return new(DeleteResourceArgs), nil
	case ProcAcquireResource:
		return new(AcquireResourceArgs), nil
	case ProcReleaseResource:
		return new(ReleaseResourceArgs), nil
	case ProcCreateLockspace:
		return new(CreateLockspaceArgs), nil
	}
	return nil, &DecodeError{Field: "header.proc", Offset: 8, Err: fmt.Errorf("%w: %d", ErrUnknownProcedure, int32(p))}
}

// DecodeArgs decodes the payload of a call to procedure p. The payload must
// be exactly the arguments: no field may be missing, over its bound or
// non-canonical (padding, optional discriminants), and nothing may follow.
// Every failure is a *DecodeError.
func DecodeArgs(p Procedure, payload []byte) (Args, error) {
	return new(argsBuf).decode(p, payload)
}

// argsBuf holds the arguments of each procedure, so that a server decodes
// the calls of a connection, one at a time, without allocating them.
type argsBuf struct {
	register       RegisterArgs
	restrict       RestrictArgs
	new            NewArgs
	createResource CreateResourceArgs
	deleteResource DeleteResourceArgs
	acquire        AcquireResourceArgs
	release        ReleaseResourceArgs
	createLS       CreateLockspaceArgs
}

// decode decodes a call to p into b, as DecodeArgs does. The arguments
// returned are valid until the next call. Each type's decode is called
// directly, so that the decoder stays on the stack.
func (b *argsBuf) decode(p Procedure, payload []byte) (Args, error) {
	d := decoder{b: payload}
	var a Args
	var err error
	switch p {
	case ProcRegister:
		b.register = RegisterArgs{}
		a, err = &b.register, b.register.decode(&d)
	case ProcRestrict:
		b.restrict = RestrictArgs{}
		a, err = &b.restrict, b.restrict.decode(&d)
	case ProcNew:
		b.new = NewArgs{}
		a, err = &b.new, b.new.decode(&d)
	case ProcCreateResource:
		b.createResource = CreateResourceArgs{}
		a, err = &b.createResource, b.createResource.decode(&d)
	case ProcDeleteResource:
		b.deleteResource = DeleteResourceArgs{}
		a, err = &b.deleteResource, b.deleteResource.decode(&d)
	case ProcAcquireResource:
		b.acquire = AcquireResourceArgs{}
		a, err = &b.acquire, b.acquire.decode(&d)
	case ProcReleaseResource:
		b.release = ReleaseResourceArgs{}
		a, err = &b.release, b.release.decode(&d)
	case ProcCreateLockspace:
		b.createLS = CreateLockspaceArgs{}
		a, err = &b.createLS, b.createLS.decode(&d)
	default:
		return NewArgsFor(p) // the unknown-procedure error
	}
	if err == nil {
		err = d.end()
	}
	if err != nil {
		return nil, err
	}
	return a, nil
}

// AppendArgs appends the XDR encoding of a to dst. It fails if a string is
// over its bound or contains a NUL byte.
func AppendArgs(dst []byte, a Args) ([]byte, error) {
	if err := a.check(); err != nil {
		return dst, err
	}
	e := encoder{b: dst}
	a.encode(&e)
	return e.b, nil
}

// AppendCall appends a whole CALL message of a with the given serial.
func AppendCall(dst []byte, serial uint32, a Args) ([]byte, error) {
	if err := a.check(); err != nil {
		return dst, err
	}
	start := len(dst)
	e := encoder{b: dst}
	e.u32(0) // length, patched below
	Header{Program: Program, Version: ProgramVersion, Procedure: a.Procedure(), Type: TypeCall, Serial: serial, Status: StatusOK}.encode(&e)
	a.encode(&e)
	n := len(e.b) - start
	if n > MaxMessageSize {
		return dst, fmt.Errorf("virtlockd protocol: encoding a %s call of %d bytes: %w", a.Procedure(), n, ErrMessageSize)
	}
	binary.BigEndian.PutUint32(e.b[start:], uint32(n))
	return e.b, nil
}

// AppendReply appends the reply to the call whose header is call: a void
// success if rerr is nil, else an error reply carrying rerr. The reply
// repeats the call's program, version, procedure and serial.
func AppendReply(dst []byte, call Header, rerr *RemoteError) ([]byte, error) {
	h := Header{Program: call.Program, Version: call.Version, Procedure: call.Procedure, Type: TypeReply, Serial: call.Serial, Status: StatusOK}
	if rerr == nil {
		return AppendMessage(dst, h, nil)
	}
	if err := rerr.check(); err != nil {
		return dst, err
	}
	h.Status = StatusError
	start := len(dst)
	e := encoder{b: dst}
	e.u32(0)
	h.encode(&e)
	rerr.encode(&e)
	n := len(e.b) - start
	if n > MaxMessageSize {
		return dst, fmt.Errorf("virtlockd protocol: encoding an error reply of %d bytes: %w", n, ErrMessageSize)
	}
	binary.BigEndian.PutUint32(e.b[start:], uint32(n))
	return e.b, nil
}
