package hierlock

import (
	"slices"
	"strings"
	"sync"
)

// LockInfo is one row of the lock monitor (Ganeti's `gnt-debug locks`): a
// plain value, safe to keep, copy and encode as JSON.
type LockInfo struct {
	Name    string        `json:"name"`              // "level/name", "level/[lockset]", or a SharedLock's own name
	State   State         `json:"mode"`              // none, exclusive, shared or deleted
	Owners  []Owner       `json:"owners,omitempty"`  // holders, naturally sorted
	Pending []PendingInfo `json:"pending,omitempty"` // queue entries, head first
}

// PendingInfo is one queue entry: one exclusive request, or the shared
// requests of one priority that will be granted together.
type PendingInfo struct {
	Mode     Mode    `json:"mode"`
	Priority int     `json:"priority"`
	Owners   []Owner `json:"owners"` // naturally sorted
}

// InfoSource is anything the monitor can ask for lock rows: *SharedLock,
// *LockSet and *Manager.
type InfoSource interface {
	AppendInfo(dst []LockInfo) []LockInfo
}

// Monitor collects lock rows from registered sources. Its zero value is
// ready to use; it is safe for concurrent use.
type Monitor struct {
	mu   sync.Mutex
	next uint64
	srcs []monitorSource
}

type monitorSource struct {
	id  uint64
	src InfoSource
}

// Register adds src; the returned function removes it again.
func (m *Monitor) Register(src InfoSource) (unregister func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.next++
	id := m.next
	m.srcs = append(m.srcs, monitorSource{id, src})
	return func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		m.srcs = slices.DeleteFunc(m.srcs, func(s monitorSource) bool { return s.id == id })
	}
}

// Snapshot returns every registered source's rows, naturally sorted by name
// (rows of equal name keep registration order). Each lock is read under its
// own mutex, so a row is consistent; rows of different locks are taken one
// after the other, not at one instant.
func (m *Monitor) Snapshot() []LockInfo {
	m.mu.Lock()
	srcs := slices.Clone(m.srcs)
	m.mu.Unlock()
	var out []LockInfo
	for _, s := range srcs {
		out = s.src.AppendInfo(out)
	}
	SortInfo(out)
	return out
}

// SortInfo sorts rows naturally by name, stably.
func SortInfo(rows []LockInfo) {
	slices.SortStableFunc(rows, func(a, b LockInfo) int { return CompareNatural(a.Name, b.Name) })
}

func sortOwners(o []Owner) {
	slices.SortFunc(o, func(a, b Owner) int { return CompareNatural(string(a), string(b)) })
}

// CompareNatural compares strings in natural order: runs of digits compare
// by numeric value ("node2" < "node10"), everything else byte by byte. It is
// a total order: strings equal but for leading zeros ("n01", "n1") are
// ordered by plain comparison. LockSets acquire their members in this order.
func CompareNatural(a, b string) int {
	// Skip the common prefix, backing up to the start of a digit run it
	// ends in: equal bytes are equal tokens.
	p := 0
	for p < len(a) && p < len(b) && a[p] == b[p] {
		p++
	}
	if p == len(a) && p == len(b) {
		return 0
	}
	for p > 0 && isDigit(a[p-1]) {
		p--
	}
	i, j := p, p
	for i < len(a) && j < len(b) {
		ca, cb := a[i], b[j]
		if isDigit(ca) && isDigit(cb) {
			si, sj := i, j
			for i < len(a) && isDigit(a[i]) {
				i++
			}
			for j < len(b) && isDigit(b[j]) {
				j++
			}
			da := strings.TrimLeft(a[si:i], "0")
			db := strings.TrimLeft(b[sj:j], "0")
			if len(da) != len(db) {
				if len(da) < len(db) {
					return -1
				}
				return 1
			}
			if c := strings.Compare(da, db); c != 0 {
				return c
			}
			continue
		}
		if ca != cb {
			if ca < cb {
				return -1
			}
			return 1
		}
		i++
		j++
	}
	switch {
	case i < len(a):
		return 1
	case j < len(b):
		return -1
	}
	return strings.Compare(a, b)
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// sortNatural returns names in natural order without duplicates, in a new
// slice.
func sortNatural(names []string) []string {
	out := slices.Clone(names)
	if !slices.IsSortedFunc(out, CompareNatural) {
		slices.SortFunc(out, CompareNatural)
	}
	return slices.Compact(out)
}
