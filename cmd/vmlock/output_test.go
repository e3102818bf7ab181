package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/vmlock/vmlock/lockmgr"
)

// The --output help names exactly the commands that honour the flag: each
// of them refuses an unknown format before it connects, and every other
// command ignores it (and gets as far as the missing daemon).
func TestOutputHelpNamesTheCommandsThatHonourIt(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	const uuid = "3f0c1a2b-1111-4222-8333-444455556666"
	args := map[string][]string{
		"status":           nil,
		"locks":            nil,
		"acquire":          {"--uuid", uuid, "--pid", "1", "--disk", "/a.img"},
		"release":          {"--uuid", uuid},
		"inquire":          {"--uuid", uuid},
		"run":              {"--disk", "/a.img", "--", "true"},
		"revoke":           {"/a.img"},
		"daemon reload":    nil,
		"hold":             {"cluster/BGL", "--", "true"},
		"blockcommit":      {"vm", "/a.img"},
		"blockcopy":        {"vm", "/a.img", "/b.img"},
		"blockjob":         {"vm", "/a.img"},
		"disk attach":      {"vm", "/a.img"},
		"disk detach":      {"vm", "/a.img"},
		"vms":              nil,
		"migrate prepare":  {"--uuid", uuid, "--to", "h2"},
		"migrate complete": {"--uuid", uuid},
	}
	named := map[string]bool{}
	for _, n := range strings.Split(strings.ReplaceAll(jsonCommands, " and ", ", "), ", ") {
		named[n] = true
	}
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			switch sub.Name() {
			case "bench", "help", "completion":
				continue
			}
			if sub.HasSubCommands() {
				walk(sub)
				continue
			}
			path := strings.TrimPrefix(sub.CommandPath(), "vmlock ")
			a, ok := args[path]
			if !ok {
				t.Errorf("command %q is not in this test: add it", path)
				continue
			}
			argv := append(append([]string{"--socket", sock, "-o", "yaml"}, strings.Fields(path)...), a...)
			refused := run(argv) == int(lockmgr.CodeInvalidArgument)
			if refused != named[path] {
				t.Errorf("vmlock %s -o yaml: refused = %v, but the --output help (%q) names it: %v", path, refused, jsonCommands, named[path])
			}
			delete(named, path)
		}
	}
	walk(newRootCmd())
	for n := range named {
		t.Errorf("the --output help names %q, which is no command", n)
	}
}
