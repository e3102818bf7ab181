package hierlock

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
)

func BenchmarkSharedLockExclusive(b *testing.B) {
	l := NewSharedLock("b", nil)
	for b.Loop() {
		if err := l.Acquire(bg, "o", Exclusive, 0); err != nil {
			b.Fatal(err)
		}
		if err := l.Release("o"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkSharedLockShared(b *testing.B) {
	l := NewSharedLock("b", nil)
	for b.Loop() {
		if err := l.Acquire(bg, "o", Shared, 0); err != nil {
			b.Fatal(err)
		}
		if err := l.Release("o"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRWMutex is the floor BenchmarkSharedLockExclusive is compared
// with.
func BenchmarkRWMutex(b *testing.B) {
	var mu sync.RWMutex
	for b.Loop() {
		mu.Lock()
		//lint:ignore SA2001 an empty critical section is the point
		mu.Unlock()
	}
}

// BenchmarkSharedLockHandoff measures contended exclusive hand-offs between
// goroutines (each grant goes through the queue).
func BenchmarkSharedLockHandoff(b *testing.B) {
	l := NewSharedLock("b", nil)
	var n atomic.Int64
	b.RunParallel(func(pb *testing.PB) {
		o := Owner(fmt.Sprint("g", n.Add(1)))
		for pb.Next() {
			if err := l.Acquire(bg, o, Exclusive, 0); err != nil {
				b.Error(err)
				return
			}
			if err := l.Release(o); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func BenchmarkLockSet100(b *testing.B) {
	names := make([]string, 100)
	for i := range names {
		names[i] = fmt.Sprintf("node%d", i)
	}
	s, err := NewLockSet("node", names, nil)
	if err != nil {
		b.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		req  Request
	}{
		{"exact", Request{Names: names}},
		{"all", Request{All: true}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := s.Acquire(bg, "o", tc.req); err != nil {
					b.Fatal(err)
				}
				if err := s.Release("o"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkManagerJob is a typical job: BGL shared, one instance, two nodes.
func BenchmarkManagerJob(b *testing.B) {
	m := newManager(b)
	for b.Loop() {
		for _, s := range []struct {
			l   Level
			req Request
		}{
			{LevelCluster, bglShared},
			{LevelInstance, Request{Names: []string{"inst1"}}},
			{LevelNode, Request{Names: []string{"node2", "node1"}}},
		} {
			if _, err := m.Acquire(bg, "job", s.l, s.req); err != nil {
				b.Fatal(err)
			}
		}
		if err := m.ReleaseAll("job"); err != nil {
			b.Fatal(err)
		}
	}
}
