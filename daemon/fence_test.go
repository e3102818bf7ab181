package daemon

import (
	"testing"
	"time"
)

// A fence deadline announced while the lock-holder is being replaced never
// deadlocks with the replacement: resyncHolder holds the records' lock
// while it asks the Fencer for the newest deadline (for the new holder), so
// Deadline must not hold the Fencer's lock while it waits for the records'
// lock. A deadlocked Deadline stops the etcd driver's renewals for good:
// the host fences itself and never starts a new session.
func TestDeadlineDuringHolderReplacement(t *testing.T) {
	f := NewFencer()
	d, _, _ := serveInProcess(t, Config{Fencer: f})

	d.recordMu.Lock() // as resyncHolder does while it replaces the holder
	dl := time.Now().Add(time.Hour)
	announced := make(chan struct{})
	go func() { f.Deadline(dl); close(announced) }()
	// resyncHolder's part: read the newest deadline until it is dl.
	newest := func() (time.Time, bool) {
		got := make(chan time.Time, 1)
		go func() { got <- f.latest() }()
		select {
		case l := <-got:
			return l, true
		case <-time.After(10 * time.Second):
			return time.Time{}, false
		}
	}
	var l time.Time
	ok := true
	for end := time.Now().Add(10 * time.Second); ok && !l.Equal(dl) && time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		l, ok = newest()
	}
	d.recordMu.Unlock()
	<-announced
	if !ok {
		t.Fatal("Fencer.latest blocked while Deadline waited for the records' lock: resyncHolder and Deadline deadlock")
	}
	if !l.Equal(dl) {
		t.Fatalf("newest deadline %v, want the announced %v", l, dl)
	}
}
