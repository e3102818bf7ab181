package hierlock

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func newManager(t testing.TB) *Manager {
	t.Helper()
	lv := DefaultLevels()
	lv[LevelInstance].Members = []string{"inst1", "inst2"}
	lv[LevelNodeGroup].Members = []string{"group1"}
	lv[LevelNode].Members = []string{"node1", "node2", "node10"}
	lv[LevelNodeRes].Members = []string{"node1", "node2", "node10"}
	lv[LevelNetwork].Members = []string{"net1"}
	m, err := NewManager(Config{Levels: lv})
	must(t, err)
	return m
}

func acq(t testing.TB, m *Manager, o Owner, l Level, req Request) {
	t.Helper()
	if _, err := m.Acquire(bg, o, l, req); err != nil {
		t.Fatal(err)
	}
}

var bglShared = Request{Names: []string{BGL}, Mode: Shared}

func TestManagerLevelsInOrder(t *testing.T) {
	m := newManager(t)
	acq(t, m, "job1", LevelCluster, bglShared)
	acq(t, m, "job1", LevelInstance, Request{Names: []string{"inst1"}})
	acq(t, m, "job1", LevelNode, Request{All: true, Mode: Shared})
	acq(t, m, "job1", LevelNodeRes, Request{Names: []string{"node2"}})
	// Lower levels may be released while higher ones are held.
	must(t, m.Release("job1", LevelInstance))
	if m.IsOwned("job1", LevelInstance) || !m.IsOwned("job1", LevelNode) {
		t.Fatal("release of instance level wrong")
	}
	want := []Holding{
		{Level: LevelCluster, Lock: "cluster/BGL", Name: "BGL", Mode: Shared},
		{Level: LevelNode, Lock: "node/[lockset]", Name: SetLockName, Mode: Shared},
		{Level: LevelNode, Lock: "node/node1", Name: "node1", Mode: Shared},
		{Level: LevelNode, Lock: "node/node2", Name: "node2", Mode: Shared},
		{Level: LevelNode, Lock: "node/node10", Name: "node10", Mode: Shared},
		{Level: LevelNodeRes, Lock: "node-res/node2", Name: "node2", Mode: Exclusive},
	}
	if got := m.Holdings("job1"); !reflect.DeepEqual(got, want) {
		t.Fatalf("holdings\n got %+v\nwant %+v", got, want)
	}
	// Another job shares the BGL and the nodes meanwhile.
	acq(t, m, "job2", LevelCluster, bglShared)
	acq(t, m, "job2", LevelNode, Request{Names: []string{"node1"}, Mode: Shared})
	must(t, m.ReleaseAll("job1"))
	must(t, m.ReleaseAll("job2"))
	if m.Holdings("job1") != nil || m.Holdings("job2") != nil {
		t.Fatal("ReleaseAll left holdings")
	}
	for _, r := range m.Snapshot() {
		if r.State != StateNone || r.Pending != nil {
			t.Fatalf("lock left: %+v", r)
		}
	}
}

// Every rule violation is an *OrderViolationError naming the lock asked for
// and the conflicting held (or missing) lock, and changes nothing.
func TestManagerOrderViolations(t *testing.T) {
	type step struct {
		level Level
		req   Request
	}
	for _, tc := range []struct {
		name     string
		setup    []step
		op       func(m *Manager) error
		rule     Rule
		lock     string
		held     string
		required string
	}{
		{
			name: "acquire-without-BGL",
			op: func(m *Manager) error {
				_, err := m.Acquire(bg, "o", LevelInstance, Request{Names: []string{"inst2", "inst1"}})
				return err
			},
			rule: RuleBGLFirst, lock: "instance/inst1", required: "cluster/BGL",
		},
		{
			name:  "acquire-lower-level-while-holding-higher",
			setup: []step{{LevelCluster, bglShared}, {LevelNode, Request{Names: []string{"node2"}}}},
			op: func(m *Manager) error {
				_, err := m.Acquire(bg, "o", LevelInstance, Request{Names: []string{"inst1"}})
				return err
			},
			rule: RuleLevelOrder, lock: "instance/inst1", held: "node/node2",
		},
		{
			name:  "acquire-all-below-held-set",
			setup: []step{{LevelCluster, bglShared}, {LevelNodeRes, Request{All: true, Mode: Shared}}},
			op: func(m *Manager) error {
				_, err := m.Acquire(bg, "o", LevelNode, Request{All: true})
				return err
			},
			rule: RuleLevelOrder, lock: "node/[lockset]", held: "node-res/[lockset]",
		},
		{
			name:  "acquire-level-twice",
			setup: []step{{LevelCluster, bglShared}, {LevelInstance, Request{Names: []string{"inst2"}}}},
			op: func(m *Manager) error {
				_, err := m.Acquire(bg, "o", LevelInstance, Request{Names: []string{"inst1"}})
				return err
			},
			rule: RuleOneCall, lock: "instance/inst1", held: "instance/inst2",
		},
		{
			name:  "release-BGL-under-higher-level",
			setup: []step{{LevelCluster, bglShared}, {LevelNetwork, Request{Names: []string{"net1"}}}},
			op:    func(m *Manager) error { return m.Release("o", LevelCluster) },
			rule:  RuleBGLLast, lock: "cluster/BGL", held: "network/net1",
		},
		{
			name:  "release-BGL-by-name-under-higher-level",
			setup: []step{{LevelCluster, bglShared}, {LevelNode, Request{Names: []string{"node1"}}}},
			op:    func(m *Manager) error { return m.ReleaseNames("o", LevelCluster, []string{BGL}) },
			rule:  RuleBGLLast, lock: "cluster/BGL", held: "node/node1",
		},
		{
			name:  "add-at-cluster-level",
			setup: []step{{LevelCluster, Request{Names: []string{BGL}}}},
			op:    func(m *Manager) error { return m.Add(bg, "o", LevelCluster, []string{"other"}, false, Exclusive) },
			rule:  RuleNotModifiable, lock: "cluster/other",
		},
		{
			name: "add-without-BGL",
			op:   func(m *Manager) error { return m.Add(bg, "o", LevelNode, []string{"node3"}, false, Exclusive) },
			rule: RuleBGLFirst, lock: "node/node3", required: "cluster/BGL",
		},
		{
			name:  "add-below-held-level",
			setup: []step{{LevelCluster, bglShared}, {LevelNode, Request{Names: []string{"node1"}}}},
			op:    func(m *Manager) error { return m.Add(bg, "o", LevelInstance, []string{"inst3"}, false, Exclusive) },
			rule:  RuleLevelOrder, lock: "instance/inst3", held: "node/node1",
		},
		{
			name:  "remove-below-held-level",
			setup: []step{{LevelCluster, bglShared}, {LevelNodeRes, Request{Names: []string{"node1"}}}},
			op: func(m *Manager) error {
				_, err := m.Remove(bg, "o", LevelInstance, []string{"inst1"})
				return err
			},
			rule: RuleLevelOrder, lock: "instance/inst1", held: "node-res/node1",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newManager(t)
			for _, s := range tc.setup {
				acq(t, m, "o", s.level, s.req)
			}
			before := m.Holdings("o")
			snap := m.Snapshot()
			err := tc.op(m)
			var ov *OrderViolationError
			if !errors.As(err, &ov) || !errors.Is(err, ErrOrderViolation) {
				t.Fatalf("got %v, want an order violation", err)
			}
			if ov.Rule != tc.rule || ov.Lock != tc.lock || ov.Held != tc.held || ov.Required != tc.required || ov.Owner != "o" {
				t.Fatalf("got %+v, want rule %v lock %q held %q required %q", ov, tc.rule, tc.lock, tc.held, tc.required)
			}
			msg := err.Error()
			for _, s := range []string{tc.lock, tc.held, tc.required} {
				if !strings.Contains(msg, s) {
					t.Fatalf("message %q does not name %q", msg, s)
				}
			}
			if tc.rule == RuleOneCall && !errors.Is(err, ErrDoubleAcquire) {
				t.Fatal("one-call violation does not match ErrDoubleAcquire")
			}
			if got := m.Holdings("o"); !reflect.DeepEqual(got, before) {
				t.Fatalf("violation changed holdings: %+v -> %+v", before, got)
			}
			if got := m.Snapshot(); !reflect.DeepEqual(got, snap) {
				t.Fatal("violation changed the lock table")
			}
		})
	}
}

func TestManagerAddRemove(t *testing.T) {
	m := newManager(t)
	acq(t, m, "o", LevelCluster, bglShared)
	must(t, m.Add(bg, "o", LevelInstance, []string{"inst3"}, true, Exclusive))
	if !slices.Equal(m.Owned("o", LevelInstance), []string{"inst3"}) {
		t.Fatalf("owned %v", m.Owned("o", LevelInstance))
	}
	// Holding the level, it may remove what it holds even while holding a
	// higher level.
	acq(t, m, "o", LevelNode, Request{Names: []string{"node1"}})
	removed, err := m.Remove(bg, "o", LevelInstance, []string{"inst3"})
	must(t, err)
	if !slices.Equal(removed, []string{"inst3"}) {
		t.Fatalf("removed %v", removed)
	}
	names, err := m.Names(LevelInstance)
	must(t, err)
	if !slices.Equal(names, []string{"inst1", "inst2"}) {
		t.Fatalf("names %v", names)
	}
	must(t, m.ReleaseAll("o"))
}

func TestManagerExclusiveBGLExcludesEveryone(t *testing.T) {
	m := newManager(t)
	acq(t, m, "a", LevelCluster, Request{Names: []string{BGL}})
	_, err := m.Acquire(timeoutCtx(0), "b", LevelCluster, bglShared)
	wantKind(t, err, ErrTimeout)
	must(t, m.Downgrade("a", LevelCluster))
	acq(t, m, "b", LevelCluster, bglShared)
}

func TestManagerConfig(t *testing.T) {
	for name, cfg := range map[string]Config{
		"no-levels":         {Levels: []LevelConfig{}},
		"empty-level-name":  {Levels: []LevelConfig{{Name: ""}}},
		"slash-in-name":     {Levels: []LevelConfig{{Name: "a/b"}}},
		"duplicate-level":   {Levels: []LevelConfig{{Name: "a"}, {Name: "a"}}},
		"modifiable-level0": {Levels: []LevelConfig{{Name: "a", Modifiable: true}}},
		"level0-members":    {Levels: []LevelConfig{{Name: "a", Members: []string{"x"}}}},
		"bad-member":        {Levels: []LevelConfig{{Name: "a"}, {Name: "b", Members: []string{""}}}},
	} {
		if _, err := NewManager(cfg); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
	// A management app's own hierarchy.
	m, err := NewManager(Config{BGL: "world", Levels: []LevelConfig{
		{Name: "site"}, {Name: "vm", Modifiable: true, Members: []string{"vm1"}}, {Name: "disk", Modifiable: true},
	}})
	must(t, err)
	if m.BGLName() != "world" {
		t.Fatal(m.BGLName())
	}
	disk, ok := m.LevelByName("disk")
	if !ok || disk != 2 {
		t.Fatalf("LevelByName(disk) = %v %v", disk, ok)
	}
	_, err = m.Acquire(bg, "o", 1, Request{Names: []string{"vm1"}})
	var ov *OrderViolationError
	if !errors.As(err, &ov) || ov.Required != "site/world" {
		t.Fatalf("got %v", err)
	}
	acq(t, m, "o", 0, Request{Names: []string{"world"}, Mode: Shared})
	acq(t, m, "o", 1, Request{Names: []string{"vm1"}})
	must(t, m.Add(bg, "o", disk, []string{"d1"}, true, Exclusive))
	if _, err := m.Acquire(bg, "o", 5, Request{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("unknown level: %v", err)
	}
}

func TestManagerZeroValue(t *testing.T) {
	var m Manager
	if len(m.Levels()) != 6 || m.Levels()[LevelNodeRes].Name != "node-res" {
		t.Fatalf("levels %+v", m.Levels())
	}
	acq(t, &m, "o", LevelCluster, bglShared)
	must(t, m.Add(bg, "o", LevelNode, []string{"n1"}, false, Exclusive))
	acq(t, &m, "o", LevelNode, Request{Names: []string{"n1"}})
}
