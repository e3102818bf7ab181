package hierlock

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// Level is an index into a Manager's levels; lower levels are acquired
// first. Level 0 is the cluster level, which holds the BGL.
type Level int

// The levels of DefaultLevels (current Ganeti's, in order).
const (
	LevelCluster   Level = iota // the BGL
	LevelInstance               // instances (VMs)
	LevelNodeGroup              // node groups
	LevelNode                   // nodes
	LevelNodeRes                // node resources (disks, memory)
	LevelNetwork                // networks
)

// BGL is the default name of the Big Global Lock, the one lock of level 0.
const BGL = "BGL"

// LevelConfig describes one level of a Manager.
type LevelConfig struct {
	Name       string   `json:"name"`              // unique; no "/"
	Modifiable bool     `json:"modifiable"`        // locks can be added and removed (never level 0)
	Members    []string `json:"members,omitempty"` // initial locks; level 0's is the BGL alone
}

// DefaultLevels returns current Ganeti's levels: cluster (the BGL),
// instance, nodegroup, node, node-res, network; all but cluster modifiable,
// all empty.
func DefaultLevels() []LevelConfig {
	return []LevelConfig{
		{Name: "cluster"},
		{Name: "instance", Modifiable: true},
		{Name: "nodegroup", Modifiable: true},
		{Name: "node", Modifiable: true},
		{Name: "node-res", Modifiable: true},
		{Name: "network", Modifiable: true},
	}
}

// Config configures a Manager. Its zero value gives DefaultLevels, a lock
// named BGL and the real clock.
type Config struct {
	Levels []LevelConfig // nil: DefaultLevels()
	BGL    string        // the name of level 0's single lock; "": BGL
	Clock  Clock         // nil: the real clock
}

// Manager is Ganeti's lock manager: one LockSet per level, and the rules
// that make every owner acquire in one global order (see the package
// comment). Rule violations fail with *OrderViolationError before anything
// is acquired or released.
//
// The zero value is a Manager with Config{}. A Manager must not be copied
// after first use. All methods are safe for concurrent use.
type Manager struct {
	once   sync.Once
	cfg    Config
	bgl    string
	levels []LevelConfig
	sets   []*LockSet
}

// NewManager returns a Manager for cfg.
//
// Errors: ErrInvalid if there is no level, a level name is empty, repeated
// or contains "/", level 0 is modifiable or has members other than the BGL,
// or a member name is invalid.
func NewManager(cfg Config) (*Manager, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg}
	m.init()
	return m, nil
}

func (c Config) bglName() string {
	if c.BGL == "" {
		return BGL
	}
	return c.BGL
}

func (c Config) levelList() []LevelConfig {
	if c.Levels == nil {
		return DefaultLevels()
	}
	return c.Levels
}

func (c Config) validate() error {
	levels := c.levelList()
	bad := func(format string, args ...any) error {
		return &Error{Kind: ErrInvalid, Msg: "manager config: " + fmt.Sprintf(format, args...)}
	}
	if len(levels) == 0 {
		return bad("no levels")
	}
	seen := map[string]bool{}
	for i, l := range levels {
		switch {
		case l.Name == "" || strings.Contains(l.Name, "/"):
			return bad("invalid level name %q", l.Name)
		case seen[l.Name]:
			return bad("level %q twice", l.Name)
		case i == 0 && l.Modifiable:
			return bad("level 0 (%s) cannot be modifiable", l.Name)
		case i == 0 && len(l.Members) > 0 && !slices.Equal(sortNatural(l.Members), []string{c.bglName()}):
			return bad("level 0 (%s) holds the BGL %q alone", l.Name, c.bglName())
		}
		seen[l.Name] = true
		if err := validNames(l.Name, l.Members); err != nil {
			return err
		}
	}
	return nil
}

func (m *Manager) init() {
	m.once.Do(func() {
		m.bgl = m.cfg.bglName()
		for i, l := range m.cfg.levelList() {
			members := l.Members
			if i == 0 {
				members = []string{m.bgl}
			}
			ls, err := NewLockSet(l.Name, members, m.cfg.Clock)
			if err != nil {
				// Unreachable after validate; keep the level usable but empty.
				ls, _ = NewLockSet(l.Name, nil, m.cfg.Clock)
			}
			m.levels = append(m.levels, LevelConfig{Name: l.Name, Modifiable: l.Modifiable && i > 0})
			m.sets = append(m.sets, ls)
		}
	})
}

// Levels returns the levels, in order (without their members: see Names).
func (m *Manager) Levels() []LevelConfig {
	m.init()
	return slices.Clone(m.levels)
}

// LevelByName returns the level called name.
func (m *Manager) LevelByName(name string) (Level, bool) {
	m.init()
	for i, l := range m.levels {
		if l.Name == name {
			return Level(i), true
		}
	}
	return 0, false
}

// BGLName returns the name of the BGL.
func (m *Manager) BGLName() string { m.init(); return m.bgl }

func (m *Manager) set(level Level) (*LockSet, error) {
	m.init()
	if level < 0 || int(level) >= len(m.sets) {
		return nil, &Error{Kind: ErrInvalid, Msg: fmt.Sprintf("no level %d", int(level))}
	}
	return m.sets[level], nil
}

// Names returns the current locks of a level, naturally sorted.
func (m *Manager) Names(level Level) ([]string, error) {
	ls, err := m.set(level)
	if err != nil {
		return nil, err
	}
	return ls.Names(), nil
}

func (m *Manager) bglLock() string { return m.sets[0].lockName(m.bgl) }

func (m *Manager) bglOwned(owner Owner) bool {
	l := m.sets[0]
	l.mu.Lock()
	defer l.mu.Unlock()
	h := l.owners[owner]
	return h != nil && h.locks[m.bgl] != nil
}

// heldAt names a lock owner holds at level ("" if none): the set-level lock
// if held (it was taken first), else the first member in natural order.
func (m *Manager) heldAt(owner Owner, level Level) string {
	ls := m.sets[level]
	if ls.OwnsAll(owner) {
		return ls.lockName(SetLockName)
	}
	if owned := ls.Owned(owner); len(owned) > 0 {
		return ls.lockName(owned[0])
	}
	return ""
}

// heldAbove names a lock owner holds above level, at the nearest such level.
func (m *Manager) heldAbove(owner Owner, level Level) string {
	for l := level + 1; int(l) < len(m.sets); l++ {
		if held := m.heldAt(owner, l); held != "" {
			return held
		}
	}
	return ""
}

// target names the lock a call is about: its first name, or the set.
func target(ls *LockSet, all bool, names []string) string {
	if all || len(names) == 0 {
		return ls.lockName(SetLockName)
	}
	return ls.lockName(sortNatural(names)[0])
}

// Acquire acquires at one level for owner (LockSet.Acquire), after checking
// the rules: the BGL is held (unless this is level 0), nothing is held at a
// higher level, and nothing is held at this level yet; and with Create (which
// adds the missing names, implicitly), that the level is modifiable.
//
// Errors: *OrderViolationError (ErrOrderViolation) naming the lock asked for
// and the conflicting held (or missing) lock, and LockSet.Acquire's errors.
func (m *Manager) Acquire(ctx context.Context, owner Owner, level Level, req Request) ([]string, error) {
	ls, err := m.set(level)
	if err != nil {
		return nil, err
	}
	lock := target(ls, req.All, req.Names)
	if req.Create && !m.levels[level].Modifiable {
		return nil, &OrderViolationError{Op: "acquire", Owner: owner, Lock: lock, Rule: RuleNotModifiable}
	}
	if level > 0 && !m.bglOwned(owner) {
		return nil, &OrderViolationError{Op: "acquire", Owner: owner, Lock: lock, Required: m.bglLock(), Rule: RuleBGLFirst}
	}
	if held := m.heldAbove(owner, level); held != "" {
		return nil, &OrderViolationError{Op: "acquire", Owner: owner, Lock: lock, Held: held, Rule: RuleLevelOrder}
	}
	if held := m.heldAt(owner, level); held != "" {
		return nil, &OrderViolationError{Op: "acquire", Owner: owner, Lock: lock, Held: held, Rule: RuleOneCall, Err: ErrDoubleAcquire}
	}
	return ls.Acquire(ctx, owner, req)
}

// Release releases everything owner holds at level. Releasing the BGL while
// holding a higher level is an order violation; any other level may be
// released at any time.
func (m *Manager) Release(owner Owner, level Level) error {
	ls, err := m.set(level)
	if err != nil {
		return err
	}
	if err := m.checkBGLRelease(owner, level, true, nil); err != nil {
		return err
	}
	return ls.Release(owner)
}

// ReleaseNames releases some locks of a level (LockSet.ReleaseNames), with
// Release's rule.
func (m *Manager) ReleaseNames(owner Owner, level Level, names []string) error {
	ls, err := m.set(level)
	if err != nil {
		return err
	}
	if err := m.checkBGLRelease(owner, level, false, names); err != nil {
		return err
	}
	return ls.ReleaseNames(owner, names)
}

func (m *Manager) checkBGLRelease(owner Owner, level Level, all bool, names []string) error {
	if level != 0 || !(all || slices.Contains(names, m.bgl)) || !m.bglOwned(owner) {
		return nil
	}
	if held := m.heldAbove(owner, 0); held != "" {
		return &OrderViolationError{Op: "release", Owner: owner, Lock: m.bglLock(), Held: held, Rule: RuleBGLLast}
	}
	return nil
}

// ReleaseAll releases everything owner holds, highest level first (what a
// daemon does when a session ends). Cancel any acquire of owner still in
// progress first: a level it is acquiring fails with ErrDoubleAcquire and
// is left to that acquire, which releases what it took when it fails.
func (m *Manager) ReleaseAll(owner Owner) error {
	m.init()
	var errs []error
	for l := len(m.sets) - 1; l >= 0; l-- {
		if m.sets[l].IsOwned(owner) {
			errs = append(errs, m.sets[l].Release(owner))
		}
	}
	return errors.Join(errs...)
}

// Downgrade downgrades everything owner holds at level to shared.
func (m *Manager) Downgrade(owner Owner, level Level) error {
	ls, err := m.set(level)
	if err != nil {
		return err
	}
	return ls.Downgrade(owner)
}

// DowngradeNames downgrades some locks of a level (LockSet.DowngradeNames).
func (m *Manager) DowngradeNames(owner Owner, level Level, names []string) error {
	ls, err := m.set(level)
	if err != nil {
		return err
	}
	return ls.DowngradeNames(owner, names)
}

// Add adds locks at a modifiable level (LockSet.Add), optionally acquired.
// Rules: the level is modifiable, owner holds the BGL and nothing at a
// higher level.
func (m *Manager) Add(ctx context.Context, owner Owner, level Level, names []string, acquired bool, mode Mode) error {
	ls, err := m.set(level)
	if err != nil {
		return err
	}
	if err := m.checkModify("add", owner, level, names, false); err != nil {
		return err
	}
	return ls.Add(ctx, owner, names, acquired, mode)
}

// Remove removes locks at a modifiable level (LockSet.Remove). Rules: the
// level is modifiable, owner holds the BGL, and owner either holds locks at
// this level or nothing at a higher one.
func (m *Manager) Remove(ctx context.Context, owner Owner, level Level, names []string) ([]string, error) {
	ls, err := m.set(level)
	if err != nil {
		return nil, err
	}
	if err := m.checkModify("remove", owner, level, names, ls.IsOwned(owner)); err != nil {
		return nil, err
	}
	return ls.Remove(ctx, owner, names)
}

func (m *Manager) checkModify(op string, owner Owner, level Level, names []string, ownsLevel bool) error {
	lock := target(m.sets[level], false, names)
	if !m.levels[level].Modifiable {
		return &OrderViolationError{Op: op, Owner: owner, Lock: lock, Rule: RuleNotModifiable}
	}
	if !m.bglOwned(owner) {
		return &OrderViolationError{Op: op, Owner: owner, Lock: lock, Required: m.bglLock(), Rule: RuleBGLFirst}
	}
	if !ownsLevel {
		if held := m.heldAbove(owner, level); held != "" {
			return &OrderViolationError{Op: op, Owner: owner, Lock: lock, Held: held, Rule: RuleLevelOrder}
		}
	}
	return nil
}

// IsOwned reports whether owner holds anything at level.
func (m *Manager) IsOwned(owner Owner, level Level) bool {
	ls, err := m.set(level)
	return err == nil && ls.IsOwned(owner)
}

// Owned returns the locks owner holds at level, naturally sorted.
func (m *Manager) Owned(owner Owner, level Level) []string {
	ls, err := m.set(level)
	if err != nil {
		return nil
	}
	return ls.Owned(owner)
}

// OwnsAll reports whether owner holds level's set-level lock.
func (m *Manager) OwnsAll(owner Owner, level Level) bool {
	ls, err := m.set(level)
	return err == nil && ls.OwnsAll(owner)
}

// Holdings returns everything owner holds, level by level.
func (m *Manager) Holdings(owner Owner) []Holding {
	m.init()
	var out []Holding
	for l, ls := range m.sets {
		for _, h := range ls.Holdings(owner) {
			h.Level = Level(l)
			out = append(out, h)
		}
	}
	return out
}

// AppendInfo appends the monitor rows of every level (InfoSource).
func (m *Manager) AppendInfo(dst []LockInfo) []LockInfo {
	m.init()
	for _, ls := range m.sets {
		dst = ls.AppendInfo(dst)
	}
	return dst
}

// Snapshot returns the monitor rows of every lock, naturally sorted by name.
func (m *Manager) Snapshot() []LockInfo {
	rows := m.AppendInfo(nil)
	SortInfo(rows)
	return rows
}
