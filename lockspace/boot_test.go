package lockspace

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vmlock/vmlock/lockmgr"
)

// driverInBoot is e.driver as if the host were in the boot bootID.
func (e *env) driverInBoot(t *testing.T, bootID string) *Driver {
	t.Helper()
	d, err := newDriver(e.cfg, bootID)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return d
}

// tokenStore is the file that holds r's last token once r is released: a
// direct lease's token file, or the .hwm of its lease file's directory (the
// last holder removes the lease file).
func (e *env) tokenStore(k kind, r lockmgr.Resource) string {
	if k.file {
		return filepath.Join(filepath.Dir(e.lockPath(r)), hwmFileName)
	}
	return e.recordPath(r)
}

func (e *env) bootRecord(t *testing.T) bootState {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.cfg.StateDir, bootFileName))
	if err != nil {
		t.Fatal(err)
	}
	s, err := parseBootState(b)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// A crash of the host can take back grants that were still in the page
// cache: here the second grant's token write is lost. After the reboot,
// tokens continue above everything granted before (the new epoch), and a
// state string that matches the record the crash left is refused, since
// the resource may have been granted since; a fresh grant works.
func TestAfterAHostCrashTokensGoOnAboveAndOldStatesAreRefused(t *testing.T) {
	for _, k := range allKinds() {
		for _, m := range []lockmgr.Mode{lockmgr.Exclusive, lockmgr.Shared} {
			t.Run(k.name+"/"+m.String(), func(t *testing.T) {
				e := newEnv(t, k.indirect)
				d1 := e.driverInBoot(t, "boot-1")
				r := k.res(t, e, 0, m)
				t1 := cycle(t, d1, r) // its release's state carries t1
				before, err := os.ReadFile(e.tokenStore(k, r))
				if err != nil {
					t.Fatal(err)
				}
				t2 := cycle(t, d1, r)
				// The host crashes (d1 is never closed) and the second
				// grant's write is lost.
				if err := os.WriteFile(e.tokenStore(k, r), before, 0o600); err != nil {
					t.Fatal(err)
				}

				d2 := e.driverInBoot(t, "boot-2")
				if got := e.bootRecord(t); got.epoch != 1 || got.trustFrom != 1 || got.clean {
					t.Fatalf("boot record after an unclean end: %+v, want epoch 1 trusted from 1, running", got)
				}
				reqs := reqsOf(otherHolder(m), r)
				reqs[0].Expect = t1
				_, err = d2.Acquire(ctx, reqs)
				var se *lockmgr.StaleStateError
				if !errors.As(err, &se) || se.Want != t1 || se.Reason == "" {
					t.Fatalf("acquire with the state of token %d after the crash: %v, want it refused as stale with the reason", t1, err)
				}
				if !strings.Contains(err.Error(), "went down") {
					t.Fatalf("the error %q does not say why the token is not trusted", err)
				}
				if got := cycle(t, d2, r); got <= t2 || got != 1<<epochShift+1 {
					t.Fatalf("first grant after the reboot took token %d, want the new epoch's first, above %d", got, t2)
				}
			})
		}
	}
}

// Close syncs and records a clean end, so after a reboot that followed it
// a state string of the last boot is as good as before, and tokens still
// move into the new epoch.
func TestAfterACleanStopAndARebootOldStatesAreAccepted(t *testing.T) {
	for _, k := range allKinds() {
		t.Run(k.name, func(t *testing.T) {
			e := newEnv(t, k.indirect)
			d1 := e.driverInBoot(t, "boot-1")
			r := k.res(t, e, 0, lockmgr.Exclusive)
			t1 := cycle(t, d1, r)
			if err := d1.Close(); err != nil {
				t.Fatal(err)
			}
			if got := e.bootRecord(t); !got.clean || got.epoch != 0 {
				t.Fatalf("boot record after Close: %+v, want epoch 0, clean", got)
			}

			d2 := e.driverInBoot(t, "boot-2")
			if got := e.bootRecord(t); got.epoch != 1 || got.trustFrom != 0 || got.clean {
				t.Fatalf("boot record after a clean end: %+v, want epoch 1 trusted from 0, running", got)
			}
			reqs := reqsOf(otherHolder(lockmgr.Exclusive), r)
			reqs[0].Expect = t1
			ls, err := d2.Acquire(ctx, reqs)
			if err != nil {
				t.Fatalf("acquire with the state of token %d after a clean reboot: %v", t1, err)
			}
			if got := ls[0].Token(); got != 1<<epochShift+1 {
				t.Fatalf("grant after the reboot took token %d, want the new epoch's first", got)
			}
		})
	}
}

// A restart of the daemon within one boot (a crash of vmlockd, not of the
// host) loses nothing from the page cache: same epoch, tokens go on by one,
// and state strings stay good.
func TestARestartInTheSameBootKeepsTheEpoch(t *testing.T) {
	e := newEnv(t, false)
	d1 := e.driverInBoot(t, "boot-1")
	r := lockmgr.LeaseResource("ls", "key", lockmgr.Exclusive)
	t1 := cycle(t, d1, r) // d1 is never closed: vmlockd was killed

	d2 := e.driverInBoot(t, "boot-1")
	reqs := reqsOf(otherHolder(lockmgr.Exclusive), r)
	reqs[0].Expect = t1
	ls, err := d2.Acquire(ctx, reqs)
	if err != nil {
		t.Fatalf("acquire with the state of token %d after a restart: %v", t1, err)
	}
	if got := ls[0].Token(); got != t1+1 {
		t.Fatalf("grant after the restart took token %d, want %d", got, t1+1)
	}
	if got := e.bootRecord(t); got.epoch != 0 || got.trustFrom != 0 || got.clean {
		t.Fatalf("boot record after a restart: %+v, want epoch 0, running", got)
	}
}

// Only records on a local file system can have been taken back by this
// host's crash; on a network file system they are trusted as before.
func TestOnlyLocalRecordsAreDistrustedAfterACrash(t *testing.T) {
	e := newEnv(t, false)
	e.driverInBoot(t, "boot-1")
	d := e.driverInBoot(t, "boot-2") // the first never closed: trusted from epoch 1
	local := mustOpen(t, e.cfg.StateDir)
	defer unix.Close(local)
	proc := mustOpen(t, "/proc/self") // procfs: not a local disk file system
	defer unix.Close(proc)
	for _, c := range []struct {
		name string
		fd   int
		tok  uint64
		want bool
	}{
		{"local, before the crash", local, 7, true},
		{"local, after it", local, 1<<epochShift + 3, false},
		{"not local, before the crash", proc, 7, false},
	} {
		if got := d.distrusted(c.fd, c.tok); got != c.want {
			t.Errorf("%s: distrusted = %v, want %v", c.name, got, c.want)
		}
	}
}

// A boot record that cannot be read does not tell the last epoch: New
// fails naming it and leaves it as it is.
func TestADamagedBootRecordFailsNew(t *testing.T) {
	e := newEnv(t, false)
	e.driverInBoot(t, "boot-1")
	p := filepath.Join(e.cfg.StateDir, bootFileName)
	damaged := []byte("vmlock.boot.v1 boot-1 \x00\x00")
	if err := os.WriteFile(p, damaged, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := newDriver(e.cfg, "boot-2")
	if err == nil || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("New on a damaged boot record: %v, want an error naming %s as damaged", err, p)
	}
	if got, _ := os.ReadFile(p); string(got) != string(damaged) {
		t.Fatalf("the damaged boot record was rewritten: %q", got)
	}
}

func TestParseBootState(t *testing.T) {
	for _, c := range []struct {
		in   string
		want bootState
		ok   bool
	}{
		{"vmlock.boot.v1 1fd0f689-4cac-4f3b-b69e-6424bec19d51 3 2 running\n", bootState{"1fd0f689-4cac-4f3b-b69e-6424bec19d51", 3, 2, false}, true},
		{"vmlock.boot.v1 b 0 0 clean\n", bootState{"b", 0, 0, true}, true},
		{"vmlock.boot.v1 b 0 0 clean", bootState{}, false},          // no newline: torn
		{"vmlock.boot.v1 b 0 0 clean\n\n", bootState{}, false},      // two lines
		{"vmlock.boot.v2 b 0 0 clean\n", bootState{}, false},        // another format
		{"vmlock.boot.v1 b 1 2 clean\n", bootState{}, false},        // trusted from the future
		{"vmlock.boot.v1 b x 0 clean\n", bootState{}, false},        // not a number
		{"vmlock.boot.v1 b 0 0 stopped\n", bootState{}, false},      // unknown state
		{"vmlock.boot.v1 b/c 0 0 clean\n", bootState{}, false},      // not a boot id
		{"vmlock.boot.v1 b 16777215 0 clean\n", bootState{}, false}, // no epoch after it
		{"vmlock.boot.v1 b 0 0 clean extra\n", bootState{}, false},  // a field too many
		{"", bootState{}, false},
	} {
		got, err := parseBootState([]byte(c.in))
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("parseBootState(%q) = %+v, %v; want %+v, ok %v", c.in, got, err, c.want, c.ok)
		}
		if c.ok && got.String() != c.in {
			t.Errorf("%+v encodes as %q, want %q", got, got.String(), c.in)
		}
	}
}
