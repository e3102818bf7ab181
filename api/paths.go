package api

import (
	"path/filepath"
	"strings"
)

// SelfRelative reports whether the absolute path p names a file through
// the entries of whichever process resolves it: /proc/self,
// /proc/thread-self, /dev/fd, /dev/stdin, /dev/stdout, /dev/stderr. vmlockd
// would resolve such a disk path to a descriptor of its own, not to the
// client's file, so it refuses one, and the CLI resolves it itself first.
func SelfRelative(p string) bool {
	p = filepath.Clean(p)
	for _, dir := range []string{"/proc/self", "/proc/thread-self", "/dev/fd"} {
		if p == dir || strings.HasPrefix(p, dir+"/") {
			return true
		}
	}
	switch p {
	case "/dev/stdin", "/dev/stdout", "/dev/stderr":
		return true
	}
	return false
}
