package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vmlock/vmlock/lockmgr"
)

// The lock monitor shows every lock, however long the reply: here 1,100
// resources with 4,000-byte names, over 4 MiB (gRPC's default limit of a
// message a client accepts).
func TestLocksShowsAReplyLargerThanFourMiB(t *testing.T) {
	d := startDaemon(t)
	owner := exec.Command("sleep", "300")
	if err := owner.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { owner.Process.Kill(); owner.Wait() })
	c := d.client()
	const objects, each = 11, 100
	for i := range objects {
		var rs []lockmgr.Resource
		for j := range each {
			name := fmt.Sprintf("%04d-%04d-%s", i, j, strings.Repeat("x", 3990))
			rs = append(rs, lockmgr.Resource{Type: "big", Name: name, Mode: lockmgr.Exclusive})
		}
		o := lockmgr.Object{UUID: fmt.Sprintf("abcdefab-0000-4000-8000-%012d", i), PID: owner.Process.Pid}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := c.Acquire(ctx, o, rs, "")
		cancel()
		if err != nil {
			t.Fatalf("acquire of object %d: %v", i, err)
		}
	}
	r := d.vmlock("locks", "-o", "json")
	if r.code != 0 {
		t.Fatalf("vmlock locks -o json: exit %d: %s", r.code, r.stderr)
	}
	var m struct {
		Resources []json.RawMessage `json:"resources"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		t.Fatal(err)
	}
	if len(m.Resources) != objects*each {
		t.Fatalf("vmlock locks listed %d resources, want %d", len(m.Resources), objects*each)
	}
}
