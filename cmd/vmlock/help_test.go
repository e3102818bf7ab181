package main

import (
	"strings"
	"testing"
)

// blockjob's help says which pivots vmlockd refuses (before ready; on a
// disk nothing in QEMU uses, where QEMU would replace nothing), that a
// job started through another QMP monitor is vmlock's to show and control,
// and that one with auto-dismiss=false stays concluded for its creator.
func TestBlockjobHelpSaysWhichPivotsAreRefusedAndWhichJobsItSees(t *testing.T) {
	var long string
	for _, c := range newRootCmd().Commands() {
		if c.Name() == "blockjob" {
			long = strings.Join(strings.Fields(c.Long), " ")
		}
	}
	for _, want := range []string{"refused before it is ready", "a disk nothing in QEMU uses", "abort instead", "started through another QMP monitor",
		"auto-dismiss=false shows as concluded", "until its creator dismisses it"} {
		if !strings.Contains(long, want) {
			t.Errorf("blockjob's help does not say %q:\n%s", want, long)
		}
	}
}

// helpOf returns the long help of the top-level command name, on one line.
func helpOf(t *testing.T, name string) string {
	t.Helper()
	for _, c := range newRootCmd().Commands() {
		if c.Name() == name {
			return strings.Join(strings.Fields(c.Long), " ")
		}
	}
	t.Fatalf("no command %s", name)
	return ""
}

// blockcopy's help says whose a new DEST is: the VM's user's, so that a
// QEMU that does not run as root can open it.
func TestBlockcopyHelpSaysDestIsTheVMsUsers(t *testing.T) {
	if long := helpOf(t, "blockcopy"); !strings.Contains(long, "creates DEST as the VM's user") {
		t.Errorf("blockcopy's help does not say DEST is created as the VM's user:\n%s", long)
	}
}

// --bandwidth's help says that a negative limit is refused (a usage
// error), as 0 is unlimited.
func TestBandwidthHelpSaysANegativeOneIsRefused(t *testing.T) {
	for _, name := range []string{"blockcommit", "blockcopy"} {
		for _, c := range newRootCmd().Commands() {
			if c.Name() != name {
				continue
			}
			if u := c.Flags().Lookup("bandwidth").Usage; !strings.Contains(u, "0 is unlimited") || !strings.Contains(u, "negative one is refused") {
				t.Errorf("%s --bandwidth help %q does not say 0 is unlimited and a negative one is refused", name, u)
			}
		}
	}
}
