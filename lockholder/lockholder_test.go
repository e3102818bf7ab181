package lockholder

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// lockedFile opens path and takes an OFD write lock on byte 0.
func lockedFile(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Len: 1}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
		t.Fatal(err)
	}
	return f
}

// free reports whether a new open file description can lock byte 0.
func free(t *testing.T, path string) bool {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Len: 1}
	err = unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk)
	if err != nil && !errors.Is(err, unix.EAGAIN) {
		t.Fatal(err)
	}
	return err == nil
}

func serve(t *testing.T, dir string) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, dir) }()
	return func() { cancel(); <-done }
}

func connect(t *testing.T, dir string) *Client {
	t.Helper()
	c, err := Connect(context.Background(), dir, func() error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestHolderKeepsLocksAfterTheSenderClosesItsCopies(t *testing.T) {
	dir := t.TempDir()
	defer serve(t, dir)()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	fa, fb := lockedFile(t, a), lockedFile(t, b)
	c := connect(t, dir)
	if err := c.Put(context.Background(), "O/x/0", []byte(`{"n":1}`), []*os.File{fa, fb}); err != nil {
		t.Fatal(err)
	}
	// The sender's copies go away, as when vmlockd is killed.
	fa.Close()
	fb.Close()
	c.Close()
	if free(t, a) || free(t, b) {
		t.Fatal("a lock went away with the sender's descriptors")
	}
	// A new controller gets the record and the descriptors back, in order.
	c2 := connect(t, dir)
	defer c2.Close()
	es, err := c2.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 1 || es[0].Key != "O/x/0" || string(es[0].Meta) != `{"n":1}` || len(es[0].Files) != 2 {
		t.Fatalf("List = %+v", es)
	}
	var st unix.Stat_t
	unix.Fstat(int(es[0].Files[1].Fd()), &st)
	var want unix.Stat_t
	unix.Stat(b, &want)
	if st.Ino != want.Ino {
		t.Fatal("descriptors came back out of order")
	}
	// Dropping the entry (and our copies) frees the locks.
	for _, f := range es[0].Files {
		f.Close()
	}
	if err := c2.DropPrefix(context.Background(), "O/x/"); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.List(context.Background()); err != nil { // a round trip: the drop was applied
		t.Fatal(err)
	}
	if !free(t, a) || !free(t, b) {
		t.Fatal("a dropped entry still holds its lock")
	}
}

func TestPutReplacesAndDropForgets(t *testing.T) {
	dir := t.TempDir()
	defer serve(t, dir)()
	p := filepath.Join(dir, "a")
	f := lockedFile(t, p)
	c := connect(t, dir)
	defer c.Close()
	c.Put(context.Background(), "k", []byte("1"), []*os.File{f})
	f.Close()
	c.Put(context.Background(), "k", []byte("2"), nil) // the new record keeps no descriptor
	c.Put(context.Background(), "other", []byte("3"), nil)
	c.Drop(context.Background(), "other")
	es, err := c.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 1 || string(es[0].Meta) != "2" || len(es[0].Files) != 0 {
		t.Fatalf("List = %+v", es)
	}
	if !free(t, p) {
		t.Fatal("a replaced entry's descriptor was kept")
	}
}

func TestOneHolderPerDirectoryAndBadMessages(t *testing.T) {
	dir := t.TempDir()
	defer serve(t, dir)()
	c := connect(t, dir)
	if err := Serve(context.Background(), dir); err == nil {
		t.Fatal("a second holder on the same directory started")
	}
	if err := c.Put(context.Background(), string(make([]byte, maxKey+1)), nil, nil); err == nil {
		t.Fatal("an over-long key was accepted")
	}
	if err := c.Put(context.Background(), "k", make([]byte, MaxMeta+1), nil); err == nil {
		t.Fatal("an over-long record was accepted")
	}
	c.Put(context.Background(), "kept", []byte("x"), nil)
	// Garbage ends that controller's connection, nothing else.
	if err := c.send(context.Background(), []byte{'?'}, nil); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c2 := connect(t, dir)
	defer c2.Close()
	es, err := c2.List(context.Background())
	if err != nil || len(es) != 1 || es[0].Key != "kept" {
		t.Fatalf("after garbage: %+v, %v", es, err)
	}
}

func TestAliveSeesTheHolderGo(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	c, err := newClient(fds[0])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !c.Alive() {
		t.Fatal("Alive is false while the other end is open")
	}
	unix.Close(fds[1]) // the holder dies
	if c.Alive() {
		t.Fatal("Alive is true after the other end closed")
	}
	if err := c.Put(context.Background(), "k", nil, nil); err == nil {
		t.Fatal("a Put to a dead holder succeeded")
	}
}

// The holder reads in batches; a burst larger than the socket buffer must
// still be applied whole and in order (the sender waits for room).
func TestBurstIsAppliedInOrder(t *testing.T) {
	dir := t.TempDir()
	defer serve(t, dir)()
	c := connect(t, dir)
	defer c.Close()
	meta := make([]byte, 1024)
	const n = 2000 // ~2 MiB of records: several times the socket buffer
	for i := range n {
		key := "O/" + strconv.Itoa(i)
		if err := c.Put(context.Background(), key, meta, nil); err != nil {
			t.Fatal(err)
		}
		if i%2 == 1 {
			if err := c.Drop(context.Background(), key); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := c.Put(context.Background(), "O/0", []byte("last"), nil); err != nil {
		t.Fatal(err)
	}
	es, err := c.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != n/2 {
		t.Fatalf("List has %d entries, want %d", len(es), n/2)
	}
	for _, e := range es {
		i, _ := strconv.Atoi(strings.TrimPrefix(e.Key, "O/"))
		if i%2 == 1 {
			t.Fatalf("dropped entry %s listed", e.Key)
		}
		if i == 0 && string(e.Meta) != "last" {
			t.Fatalf("O/0 = %q: a later put was applied before an earlier one", e.Meta)
		}
	}
}

// A holder that keeps nothing exits when its controller leaves. A new
// controller that reached it at that moment sees it go without an answer;
// Open then starts a new holder and lists what that one keeps, instead of
// failing the start of vmlockd.
func TestOpenOutlivesAHolderThatIsLeaving(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, SocketName)
	// The leaving holder: it takes the connection and goes without a word.
	lfd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(lfd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(lfd, 8); err != nil {
		t.Fatal(err)
	}
	go func() {
		cfd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		os.Remove(path)
		unix.Close(lfd)
		if err == nil {
			unix.Close(cfd)
		}
	}()
	starts := 0
	start := func() error {
		starts++
		t.Cleanup(serve(t, dir))
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, entries, err := Open(ctx, dir, start)
	if err != nil {
		t.Fatalf("Open with a holder leaving: %v", err)
	}
	defer c.Close()
	if len(entries) != 0 || starts != 1 {
		t.Fatalf("Open listed %d entries and started %d holders, want 0 and 1", len(entries), starts)
	}
	// The client it returned is served by the new holder.
	if err := c.Put(context.Background(), "k", []byte("m"), nil); err != nil {
		t.Fatal(err)
	}
	if entries, err := c.List(context.Background()); err != nil || len(entries) != 1 || entries[0].Key != "k" {
		t.Fatalf("List after Put = %v, %v; want the one entry", entries, err)
	}
}

// Open does not retry what retrying cannot fix: with no holder and a start
// that fails, it returns the start's error.
func TestOpenReturnsAFailedStart(t *testing.T) {
	_, _, err := Open(context.Background(), filepath.Join(t.TempDir(), "missing"), func() error { return errors.New("cannot start") })
	if err == nil || !strings.Contains(err.Error(), "cannot start") {
		t.Fatalf("Open with no holder and a failing start = %v, want the start's error", err)
	}
}

// A started holder that never listens (it found the previous holder still
// exiting, and Serve refused to run) is followed by another start.
func TestConnectStartsAgainIfNobodyListens(t *testing.T) {
	dir := t.TempDir()
	starts := 0
	start := func() error {
		if starts++; starts > 1 { // the first start's holder gave up at once
			t.Cleanup(serve(t, dir))
		}
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := Connect(ctx, dir, start)
	if err != nil {
		t.Fatalf("Connect after a holder that gave up: %v", err)
	}
	defer c.Close()
	if starts < 2 {
		t.Fatalf("started %d holder(s), want a second start", starts)
	}
	if _, err := c.List(context.Background()); err != nil {
		t.Fatalf("List from the second holder: %v", err)
	}
}

// metas returns the records the holder keeps, by key (closing the
// descriptors List passed).
func metas(t *testing.T, c *Client) map[string]string {
	t.Helper()
	es, err := c.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for i := range es {
		m[es[i].Key] = string(es[i].Meta)
		es[i].Close()
	}
	return m
}

// A batch (Apply) changes the holder's entries all at once when its last
// message is in, and not at all if its controller goes before that (as
// vmlockd killed while sending an object's chunks): the entries stay as
// they were, and the descriptors the unfinished batch carried are closed,
// their locks freed.
func TestABatchIsAppliedWholeOrNotAtAll(t *testing.T) {
	dir := t.TempDir()
	defer serve(t, dir)()
	ctx := context.Background()
	a, b, n := filepath.Join(dir, "a"), filepath.Join(dir, "b"), filepath.Join(dir, "new")
	fa, fb := lockedFile(t, a), lockedFile(t, b)
	c := connect(t, dir)
	err := c.Apply(ctx, []Op{{Key: "O/x/0", Meta: []byte("old0"), Files: []*os.File{fa}}, {Key: "O/x/1", Meta: []byte("old1"), Files: []*os.File{fb}}})
	c.Close()
	if err != nil {
		t.Fatal(err)
	}
	fa.Close()
	fb.Close()
	begin, _ := encode(opBegin, "", nil)
	put, _ := encode(opPut, "O/x/0", []byte("new0"))
	drop, _ := encode(opDrop, "O/x/1", nil)

	// A controller that goes before committing.
	fd, err := dial(filepath.Join(dir, SocketName))
	if err != nil {
		t.Fatal(err)
	}
	fn := lockedFile(t, n)
	for i, msg := range [][]byte{begin, put, drop} { // no commit
		var files []*os.File
		if i == 1 {
			files = []*os.File{fn}
		}
		if err := sendmsg(fd, msg, files); err != nil {
			t.Fatal(err)
		}
	}
	fn.Close()
	unix.Close(fd)
	c = connect(t, dir)
	defer c.Close() // before the holder's stop, which waits for its controller to go
	if got := metas(t, c); len(got) != 2 || got["O/x/0"] != "old0" || got["O/x/1"] != "old1" {
		t.Fatalf("after a batch left unfinished the holder keeps %v, want both old records", got)
	}
	if free(t, a) || free(t, b) || !free(t, n) {
		t.Fatalf("after a batch left unfinished: a free %v, b free %v, new free %v; want the old locks held and the new one freed",
			free(t, a), free(t, b), free(t, n))
	}

	// The same batch, finished.
	fn = lockedFile(t, n)
	if err := c.Apply(ctx, []Op{{Key: "O/x/0", Meta: []byte("new0"), Files: []*os.File{fn}}, {Key: "O/x/1", Drop: true}}); err != nil {
		t.Fatal(err)
	}
	fn.Close()
	if got := metas(t, c); len(got) != 1 || got["O/x/0"] != "new0" {
		t.Fatalf("after a batch the holder keeps %v, want the new record 0 only", got)
	}
	if !free(t, a) || !free(t, b) || free(t, n) {
		t.Fatal("after a batch the old locks are held or the new one is not")
	}
}

// A batch out of order (a commit without a begin, a second begin, a list
// or a fence inside one) ends that controller's connection, and nothing of
// the batch is applied.
func TestABatchOutOfOrderEndsTheConnectionAndChangesNothing(t *testing.T) {
	dir := t.TempDir()
	defer serve(t, dir)()
	msg := func(op byte, key string, meta []byte) []byte { b, _ := encode(op, key, meta); return b }
	begin, commit := msg(opBegin, "", nil), msg(opCommit, "", nil)
	put, drop := msg(opPut, "new", []byte("n")), msg(opDrop, "kept", nil)
	for _, tc := range []struct {
		name string
		msgs [][]byte
	}{
		{"commit without begin", [][]byte{put, commit}},
		{"two begins", [][]byte{begin, put, drop, begin, commit}},
		{"list inside a batch", [][]byte{begin, put, drop, msg(opList, "", nil), commit}},
		{"fence inside a batch", [][]byte{begin, put, drop, msg(opFence, "", make([]byte, 8)), commit}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := connect(t, dir)
			err := c.Put(context.Background(), "kept", []byte("x"), nil)
			c.Drop(context.Background(), "new")
			c.Close()
			if err != nil {
				t.Fatal(err)
			}
			fd, err := dial(filepath.Join(dir, SocketName))
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range tc.msgs {
				sendmsg(fd, m, nil) // the holder may have hung up already
			}
			// The holder ends the connection: a read sees its end.
			unix.SetNonblock(fd, false)
			n, _, _, _, rerr := unix.Recvmsg(fd, make([]byte, 64), nil, 0)
			unix.Close(fd)
			c = connect(t, dir)
			defer c.Close()
			if ended := n == 0 && rerr == nil || errors.Is(rerr, unix.ECONNRESET); !ended {
				t.Fatalf("the holder answered %d bytes (%v), want the connection ended", n, rerr)
			}
			got := metas(t, c)
			if tc.name == "commit without begin" {
				delete(got, "new") // a put outside any batch is applied
			}
			if len(got) != 1 || got["kept"] != "x" {
				t.Fatalf("after a batch out of order the holder keeps %v, want only what was there before", got)
			}
		})
	}
}

// A holder left running by a vmlockd from before batches (it ends a
// connection that sends 'B') gets a batch's changes one by one: Apply
// learns which holder it is from a list, and every change is made.
func TestApplyToAHolderFromBeforeBatchesSendsTheChangesOneByOne(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serveWith(ctx, dir, false) }()
	defer func() { cancel(); <-done }()
	c := connect(t, dir)
	defer c.Close()
	a := filepath.Join(dir, "a")
	fa := lockedFile(t, a)
	err := c.Apply(context.Background(), []Op{{Key: "O/x/0", Meta: []byte("0"), Files: []*os.File{fa}}, {Key: "O/x/1", Meta: []byte("1")}})
	fa.Close()
	if err != nil {
		t.Fatal(err)
	}
	if got := metas(t, c); len(got) != 2 || got["O/x/0"] != "0" || got["O/x/1"] != "1" {
		t.Fatalf("the old holder keeps %v, want both changes made", got)
	}
	if free(t, a) {
		t.Fatal("the old holder did not keep the descriptor")
	}
	if !c.Alive() {
		t.Fatal("the old holder ended the connection")
	}
}
