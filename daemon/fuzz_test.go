package daemon

import (
	"strings"
	"testing"
)

// The lock-holder's keys are read back after a restart or a crash: every
// key recordKey writes parses to its uuid and chunk, and a key it cannot
// write ("O/u/00", "O/u/+1") is no record, never a second spelling of one
// chunk.
func FuzzRecordKey(f *testing.F) {
	f.Add("O/6f0e2c4c-5d1e-4a39-9a55-1a2b3c4d5e6f/0", "6f0e2c4c-5d1e-4a39-9a55-1a2b3c4d5e6f", 3)
	f.Add("O/u/00", "u", 0)
	f.Add("O/u/+1", "", -1)
	f.Add("L/u/disk:/a", "u/v", 1<<40)
	f.Fuzz(func(t *testing.T, k, uuid string, chunk int) {
		if u, c, ok := parseRecordKey(k); ok && recordKey(u, c) != k {
			t.Fatalf("parseRecordKey(%q) = %q, %d: the key of that is %q", k, u, c, recordKey(u, c))
		}
		if chunk < 0 || strings.Contains(uuid, "/") {
			return
		}
		if u, c, ok := parseRecordKey(recordKey(uuid, chunk)); !ok || u != uuid || c != chunk {
			t.Fatalf("recordKey(%q, %d) = %q parses as %q, %d, %v", uuid, chunk, recordKey(uuid, chunk), u, c, ok)
		}
	})
}
