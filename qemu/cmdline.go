package qemu

import (
	"cmp"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// DriveSpec is an image file a QEMU command line opens, as far as the
// command line tells. The backing files of the image are not listed: they
// are named in the image's header (see BackingChain).
type DriveSpec struct {
	// ID is the drive's id (-drive id=), or the node name of the -blockdev
	// that opens the file; "" if the command line gives none.
	ID string
	// Path is the file as written on the command line (relative paths are
	// relative to QEMU's working directory).
	Path string
	// Format is the image format the command line forces ("qcow2", "raw"),
	// or "" if QEMU probes it.
	Format string
	// ReadOnly is set for drives QEMU never writes: readonly=on,
	// read-only=on, media=cdrom, -cdrom.
	ReadOnly bool
	// Shared is set when a guest device uses the drive with share-rw=on.
	Shared bool
	// Backing is set for a file that QEMU opens as a backing image: a
	// -blockdev's nested "backing" options, or a -drive with snapshot=on
	// or under -snapshot (QEMU writes to a temporary overlay above it and
	// reads the file through it).
	Backing bool

	fromBlockdev bool // -snapshot does not apply
}

// CommandLine is what vmlock needs to know of a QEMU command line.
type CommandLine struct {
	// Drives are the local image files the command line names, in order.
	// Protocol URLs (nbd:, rbd:, json:, ...) are not listed.
	Drives []DriveSpec
	// Name is the guest's name (-name), or "".
	Name string
	// Paused reports whether the command line has -S (do not start the
	// guest's CPUs until "cont").
	Paused bool
	// Daemonize reports -daemonize: QEMU forks, and the process started
	// exits.
	Daemonize bool
	// ChardevIDs are the ids of the -chardev options, so that a caller
	// adding its own chardev can refuse a clash.
	ChardevIDs []string
}

// noArgOptions are QEMU 7.2's options that take no argument; every other
// option takes exactly one. Knowing them tells an option's argument from
// the positional image (QEMU's implicit -hda).
var noArgOptions = []string{
	"S", "s", "snapshot", "nodefaults", "nographic", "no-reboot", "no-shutdown",
	"daemonize", "enable-kvm", "no-user-config", "no-hpet", "no-acpi", "full-screen",
	"alt-grab", "ctrl-grab", "win2k-hack", "no-fd-bootchk", "no-quit", "only-migratable",
	"preconfig", "semihosting", "usb", "enable-fips", "curses", "portrait", "no-frame",
	"old-param", "h", "help", "version", "enable-sync-profile", "xen-attach", "xen-domid-restrict",
	"mem-prealloc", "singlestep", "async-teardown", "audio-help",
}

// ParseCommandLine reads the images, the name and -S from QEMU's
// arguments (without the program name). It understands -drive, -blockdev
// (key=value and JSON forms), -hda..-hdd, -fda/-fdb, -cdrom, -sd,
// -mtdblock, -pflash, the positional image, -device ...,drive=X,share-rw=on,
// -snapshot, -name and -S. Options it does not know are skipped with their
// argument. It fails on an option without its argument and on -blockdev
// JSON it cannot parse.
func ParseCommandLine(args []string) (CommandLine, error) {
	var cl CommandLine
	snapshot := false
	shared := map[string]bool{}
	var drives []DriveSpec
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") || a == "-" {
			if p, ok := filenamePath(a, ""); ok {
				drives = append(drives, DriveSpec{Path: p}) // the implicit -hda
			}
			continue
		}
		opt := strings.TrimLeft(a, "-")
		if slices.Contains(noArgOptions, opt) {
			switch opt {
			case "S":
				cl.Paused = true
			case "snapshot":
				snapshot = true
			case "daemonize":
				cl.Daemonize = true
			}
			continue
		}
		if i+1 >= len(args) {
			return cl, fmt.Errorf("qemu command line: option %s needs an argument", a)
		}
		i++
		val := args[i]
		switch opt {
		case "drive":
			if d, ok := parseDrive(val); ok {
				drives = append(drives, d)
			}
		case "blockdev":
			ds, err := parseBlockdev(val)
			if err != nil {
				return cl, err
			}
			drives = append(drives, ds...)
		case "hda", "hdb", "hdc", "hdd", "fda", "fdb", "sd", "mtdblock", "pflash":
			if p, ok := filenamePath(val, ""); ok {
				drives = append(drives, DriveSpec{Path: p})
			}
		case "cdrom":
			if p, ok := filenamePath(val, ""); ok {
				drives = append(drives, DriveSpec{Path: p, ReadOnly: true})
			}
		case "device":
			o := parseOpts(val, "driver")
			if d := o.get("drive"); d != "" && o.all(isOn, "share-rw") {
				shared[d] = true
			}
		case "name":
			cl.Name = parseOpts(val, "guest").get("guest")
		case "chardev":
			cl.ChardevIDs = append(cl.ChardevIDs, parseOpts(val, "backend").get("id"))
		}
	}
	for i := range drives {
		d := &drives[i]
		if snapshot && !d.fromBlockdev {
			d.Backing = true
		}
		d.Shared = d.ID != "" && shared[d.ID]
	}
	cl.Drives = drives
	return cl, nil
}

func parseDrive(val string) (DriveSpec, bool) {
	o := parseOpts(val, "")
	drv := o.get("file.driver")
	if drv != "" && !isLocalDriver(drv) {
		return DriveSpec{}, false // nbd, blkdebug...: see CommandLine.Drives
	}
	path, ok := o.get("file.filename"), true // an option of the driver: taken as it is
	if path == "" {
		path, ok = filenamePath(o.get("file"), drv)
	}
	if !ok || path == "" {
		return DriveSpec{}, false
	}
	d := DriveSpec{ID: o.get("id"), Path: path, Format: cmp.Or(o.get("format"), o.get("driver"))}
	if d.ID == "" {
		d.ID = o.get("node-name")
	}
	d.ReadOnly = o.all(isOn, "readonly", "read-only") || o.all(func(v string) bool { return v == "cdrom" }, "media")
	d.Backing = o.all(isOn, "snapshot")
	return d, true
}

// parseBlockdev lists the local files a -blockdev opens: every "file" or
// "host_device" node in its option tree.
func parseBlockdev(val string) ([]DriveSpec, error) {
	var tree map[string]any
	if strings.HasPrefix(strings.TrimSpace(val), "{") {
		if err := json.Unmarshal([]byte(val), &tree); err != nil {
			return nil, fmt.Errorf("qemu command line: -blockdev %s: %w", val, err)
		}
	} else {
		tree = map[string]any{}
		for _, e := range parseOpts(val, "") {
			m := tree
			parts := strings.Split(e.key, ".")
			for _, p := range parts[:len(parts)-1] {
				sub, ok := m[p].(map[string]any)
				if !ok {
					sub = map[string]any{}
					m[p] = sub
				}
				m = sub
			}
			// A subtree outlives a scalar of its name ("file=node0" next to
			// "file.filename=..."): QEMU refuses such a line, and listing
			// the file costs only a lock.
			if _, sub := m[parts[len(parts)-1]].(map[string]any); !sub {
				m[parts[len(parts)-1]] = e.value
			}
		}
	}
	id, _ := tree["node-name"].(string)
	var out []DriveSpec
	// walk visits a node of the tree: format is the format whose "file"
	// subtree the node is in ("" if none), backing whether it is under a
	// "backing" child.
	var walk func(n map[string]any, format string, backing, ro bool)
	walk = func(n map[string]any, format string, backing, ro bool) {
		drv, _ := n["driver"].(string)
		ro = ro || isTrue(n["read-only"])
		if isLocalDriver(drv) {
			// The driver is named, so QEMU takes the filename as it is, even
			// "nbd:x" (a relative path).
			if p, _ := n["filename"].(string); p != "" {
				out = append(out, DriveSpec{ID: id, Path: p, Format: format, ReadOnly: ro, Backing: backing, fromBlockdev: true})
			}
			return
		}
		keys := make([]string, 0, len(n))
		for k := range n {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			sub, ok := n[k].(map[string]any)
			if !ok {
				continue // a scalar, or a reference to another node by name
			}
			f, b := format, backing
			switch {
			case k == "backing":
				f, b = "", true
			case isFormat(drv) && k == "file":
				f = drv
			case isFormat(drv):
				f = "" // a data-file, an external data store...
			}
			walk(sub, f, b, ro)
		}
	}
	walk(tree, "", false, false)
	return out, nil
}

// isFormat reports whether drv is an image format driver (as opposed to a
// protocol or a filter).
func isFormat(drv string) bool {
	switch drv {
	case "qcow2", "raw", "qcow", "qed", "vmdk", "vdi", "vpc", "vhdx", "luks", "parallels", "bochs", "cloop", "dmg":
		return true
	}
	return false
}

// isLocalDriver reports whether drv is a protocol driver of local files.
func isLocalDriver(drv string) bool {
	return drv == "file" || drv == "host_device" || drv == "host_cdrom"
}

// filenamePath returns the local file that QEMU opens for a filename given
// the legacy way (-drive file=, -hda, -cdrom, the positional image), with
// drv the -drive's file.driver or "". Without a driver QEMU reads
// "PROTOCOL:rest" (the part before the first colon has no slash) as a
// protocol URL: nbd:, rbd:, json:{...} name no local file, but file:,
// host_device: and host_cdrom: name the local file rest. A named local
// driver strips only its own prefix and takes the rest as it is. ok is
// false when the filename names no local file.
func filenamePath(p, drv string) (path string, ok bool) {
	if drv != "" {
		p = strings.TrimPrefix(p, drv+":")
		return p, p != ""
	}
	i := strings.IndexByte(p, ':')
	if i < 0 || strings.Contains(p[:i], "/") {
		return p, p != "" // no protocol: a path
	}
	if !isLocalDriver(p[:i]) {
		return "", false
	}
	p = p[i+1:]
	return p, p != ""
}

func isOn(v string) bool {
	switch v {
	case "on", "true", "yes":
		return true
	}
	return false
}

func isTrue(v any) bool {
	switch v := v.(type) {
	case bool:
		return v
	case string:
		return isOn(v)
	}
	return false
}

// options are QEMU options ("key=value,...") in the order given. A key may
// be given twice; QEMU reads some options' first value and others' last.
type options []option

type option struct{ key, value string }

// get returns the last value of key, or "".
func (o options) get(key string) string {
	for i := len(o) - 1; i >= 0; i-- {
		if o[i].key == key {
			return o[i].value
		}
	}
	return ""
}

// all reports whether any of keys is given and every value given to them
// satisfies ok. It answers flags that make vmlock lock less (readonly,
// share-rw, snapshot): true only if the first and the last value agree.
func (o options) all(ok func(string) bool, keys ...string) bool {
	given := false
	for _, e := range o {
		if slices.Contains(keys, e.key) {
			if !ok(e.value) {
				return false
			}
			given = true
		}
	}
	return given
}

// parseOpts parses QEMU's option syntax as QEMU does (util/qemu-option.c):
// a key ends at "=" or ","; a value ends at a lone ",", and ",," in it is
// a comma. A first element without "=" is, if implied is not "", the value
// of implied; any other is a flag: "readonly" is readonly=on, "noreadonly"
// readonly=off. Every string parses.
func parseOpts(s, implied string) options {
	var o options
	for first := true; s != ""; first = false {
		n := strings.IndexAny(s, "=,")
		if n < 0 {
			n = len(s)
		}
		var e option
		switch {
		case n < len(s) && s[n] == '=':
			e.key = s[:n]
			e.value, s = optValue(s[n+1:])
		case first && implied != "":
			e.key = implied
			e.value, s = optValue(s)
		default:
			e.key, e.value, s = s[:n], "on", s[n:]
			if k, no := strings.CutPrefix(e.key, "no"); no {
				e.key, e.value = k, "off"
			}
		}
		o = append(o, e)
		s = strings.TrimPrefix(s, ",")
	}
	return o
}

// optValue reads a value up to a lone comma, which it leaves in rest.
func optValue(s string) (value, rest string) {
	var b strings.Builder
	for {
		i := strings.IndexByte(s, ',')
		if i < 0 {
			b.WriteString(s)
			return b.String(), ""
		}
		if i+1 < len(s) && s[i+1] == ',' {
			b.WriteString(s[:i+1])
			s = s[i+2:]
			continue
		}
		b.WriteString(s[:i])
		return b.String(), s[i:]
	}
}
