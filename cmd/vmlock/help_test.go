package main

import (
	"strings"
	"testing"
)

// blockjob's help says which pivots vmlockd refuses (before ready; on a
// disk nothing in QEMU uses, where QEMU would replace nothing) and that a
// job started through another QMP monitor is vmlock's to show and control.
func TestBlockjobHelpSaysWhichPivotsAreRefusedAndWhichJobsItSees(t *testing.T) {
	var long string
	for _, c := range newRootCmd().Commands() {
		if c.Name() == "blockjob" {
			long = strings.Join(strings.Fields(c.Long), " ")
		}
	}
	for _, want := range []string{"refused before it is ready", "a disk nothing in QEMU uses", "abort instead", "started through another QMP monitor"} {
		if !strings.Contains(long, want) {
			t.Errorf("blockjob's help does not say %q:\n%s", want, long)
		}
	}
}
