package hierlock

import (
	"encoding/json"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
)

func TestCompareNatural(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"node2", "node10", -1},
		{"node10", "node2", 1},
		{"node1", "node1", 0},
		{"node", "node1", -1},
		{"a10b2", "a10b10", -1},
		{"inst1.example.com", "inst10.example.com", -1},
		{"n01", "n1", -1}, // equal numbers: plain order breaks the tie
		{"n1", "n01", 1},
		{"n007", "n7a", -1},
		{"abc", "abd", -1},
		{"", "a", -1},
		{"x9", "x10y", -1},
		{"[lockset]", "a", -1},
	} {
		if got := CompareNatural(tc.a, tc.b); got != tc.want {
			t.Errorf("CompareNatural(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

// CompareNatural is a total order: antisymmetric, transitive, and 0 only
// for equal strings, so every owner sorts names the same way.
func TestCompareNaturalIsTotalOrder(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	alphabet := "ab0019."
	gen := func() string {
		b := make([]byte, rnd.IntN(6))
		for i := range b {
			b[i] = alphabet[rnd.IntN(len(alphabet))]
		}
		return string(b)
	}
	var s []string
	for range 300 {
		s = append(s, gen())
	}
	for _, a := range s[:60] {
		for _, b := range s[:60] {
			ab, ba := CompareNatural(a, b), CompareNatural(b, a)
			if ab != -ba || (ab == 0) != (a == b) {
				t.Fatalf("CompareNatural(%q,%q)=%d, reverse %d", a, b, ab, ba)
			}
			for _, c := range s[:60] {
				if ab < 0 && CompareNatural(b, c) < 0 && CompareNatural(a, c) >= 0 {
					t.Fatalf("not transitive: %q < %q < %q", a, b, c)
				}
			}
		}
	}
	sorted := slices.Clone(s)
	slices.SortFunc(sorted, CompareNatural)
	for i := 1; i < len(sorted); i++ {
		if CompareNatural(sorted[i-1], sorted[i]) > 0 {
			t.Fatalf("sort not ordered at %d", i)
		}
	}
}

func TestMonitorSnapshot(t *testing.T) {
	m := newManager(t)
	acq(t, m, "job2", LevelCluster, bglShared)
	acq(t, m, "job10", LevelCluster, bglShared)
	acq(t, m, "job2", LevelNode, Request{Names: []string{"node10"}})
	w := async(func() error {
		_, err := m.Acquire(bg, "job10", LevelNode, Request{Names: []string{"node10"}, Mode: Shared, Priority: -3})
		return err
	})
	waitQueued(t, member(t, m.sets[LevelNode], "node10"), "job10")

	var mon Monitor
	other := NewSharedLock("aaa-standalone", nil)
	unregister := mon.Register(other)
	mon.Register(m)
	rows := mon.Snapshot()
	var names []string
	byName := map[string]LockInfo{}
	for _, r := range rows {
		names = append(names, r.Name)
		byName[r.Name] = r
	}
	want := []string{
		"aaa-standalone",
		"cluster/BGL", "cluster/[lockset]",
		"instance/[lockset]", "instance/inst1", "instance/inst2",
		"network/[lockset]", "network/net1",
		"node-res/[lockset]", "node-res/node1", "node-res/node2", "node-res/node10",
		"node/[lockset]", "node/node1", "node/node2", "node/node10",
		"nodegroup/[lockset]", "nodegroup/group1",
	}
	if !slices.Equal(names, want) {
		t.Fatalf("rows\n got %v\nwant %v", names, want)
	}
	if got := byName["cluster/BGL"]; got.State != StateShared || !slices.Equal(got.Owners, []Owner{"job2", "job10"}) {
		t.Fatalf("BGL row %+v", got)
	}
	wantNode := LockInfo{Name: "node/node10", State: StateExclusive, Owners: []Owner{"job2"},
		Pending: []PendingInfo{{Mode: Shared, Priority: -3, Owners: []Owner{"job10"}}}}
	if got := byName["node/node10"]; !reflect.DeepEqual(got, wantNode) {
		t.Fatalf("node10 row\n got %+v\nwant %+v", got, wantNode)
	}
	b, err := json.Marshal(byName["node/node10"])
	must(t, err)
	const wantJSON = `{"name":"node/node10","mode":"exclusive","owners":["job2"],"pending":[{"mode":"shared","priority":-3,"owners":["job10"]}]}`
	if string(b) != wantJSON {
		t.Fatalf("json %s\nwant %s", b, wantJSON)
	}
	var back LockInfo
	must(t, json.Unmarshal(b, &back))
	if !reflect.DeepEqual(back, wantNode) {
		t.Fatalf("json round trip %+v", back)
	}
	unregister()
	if mon.Snapshot()[0].Name != "cluster/BGL" {
		t.Fatal("unregister kept the source")
	}
	must(t, m.Release("job2", LevelNode))
	must(t, result(t, w))
	if got := m.Snapshot(); !slices.EqualFunc(got, rows[1:], func(a, b LockInfo) bool { return a.Name == b.Name }) {
		t.Fatal("Manager.Snapshot differs from the monitor's rows")
	}
}

func TestModeText(t *testing.T) {
	for _, m := range []Mode{Exclusive, Shared} {
		b, err := m.MarshalText()
		must(t, err)
		var back Mode
		must(t, back.UnmarshalText(b))
		if back != m {
			t.Fatalf("%v round-trips to %v", m, back)
		}
	}
	var m Mode
	wantKind(t, m.UnmarshalText([]byte("both")), ErrInvalid)
	if _, err := Mode(5).MarshalText(); err == nil {
		t.Fatal("invalid mode marshalled")
	}
	for s := StateNone; s <= StateDeleted; s++ {
		b, _ := s.MarshalText()
		var back State
		must(t, back.UnmarshalText(b))
		if back != s {
			t.Fatalf("%v round-trips to %v", s, back)
		}
	}
}
