package hierlock

import "fmt"

// Owner identifies who holds or waits for a lock. Go has no thread identity,
// so every call names its owner explicitly: a job id, a client session, a
// goroutine's task name. Owners are compared with ==; the empty Owner is
// invalid. An owner is one logical actor: its calls on one lock, set or
// manager are expected not to overlap (like a thread's), and if they do the
// second call fails with ErrDoubleAcquire rather than corrupting anything.
type Owner string

// Mode is the mode a lock is requested or held in. The zero value is
// Exclusive, as in Ganeti, where acquire() defaults to shared=0.
type Mode uint8

// The two modes.
const (
	Exclusive Mode = iota // one holder
	Shared                // many holders, excludes Exclusive
)

func (m Mode) String() string {
	switch m {
	case Exclusive:
		return "exclusive"
	case Shared:
		return "shared"
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

func (m Mode) valid() bool { return m == Exclusive || m == Shared }

// MarshalText encodes the mode as "exclusive" or "shared".
func (m Mode) MarshalText() ([]byte, error) {
	if !m.valid() {
		return nil, &Error{Kind: ErrInvalid, Msg: "invalid mode " + m.String()}
	}
	return []byte(m.String()), nil
}

// UnmarshalText accepts "exclusive" (or "x") and "shared" (or "s").
func (m *Mode) UnmarshalText(b []byte) error {
	switch string(b) {
	case "exclusive", "x":
		*m = Exclusive
	case "shared", "s":
		*m = Shared
	default:
		return &Error{Kind: ErrInvalid, Msg: fmt.Sprintf("invalid mode %q (want exclusive or shared)", b)}
	}
	return nil
}

// State is a lock's state as the monitor shows it.
type State uint8

// The states of a lock.
const (
	StateNone      State = iota // nobody holds it
	StateExclusive              // one owner holds it exclusively
	StateShared                 // one or more owners hold it shared
	StateDeleted                // deleted: every acquire fails with ErrDeleted
)

func (s State) String() string {
	switch s {
	case StateNone:
		return "none"
	case StateExclusive:
		return "exclusive"
	case StateShared:
		return "shared"
	case StateDeleted:
		return "deleted"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// MarshalText encodes the state as its String.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText is the inverse of MarshalText.
func (s *State) UnmarshalText(b []byte) error {
	for c := StateNone; c <= StateDeleted; c++ {
		if c.String() == string(b) {
			*s = c
			return nil
		}
	}
	return &Error{Kind: ErrInvalid, Msg: fmt.Sprintf("invalid lock state %q", b)}
}
