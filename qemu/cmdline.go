package qemu

import (
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
// argument. It fails only on an option value it cannot parse.
func ParseCommandLine(args []string) (CommandLine, error) {
	var cl CommandLine
	snapshot := false
	shared := map[string]bool{}
	var drives []DriveSpec
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") || a == "-" {
			drives = append(drives, DriveSpec{Path: a}) // the implicit -hda
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
			d, ok, err := parseDrive(val)
			if err != nil {
				return cl, err
			}
			if ok {
				drives = append(drives, d)
			}
		case "blockdev":
			ds, err := parseBlockdev(val)
			if err != nil {
				return cl, err
			}
			drives = append(drives, ds...)
		case "hda", "hdb", "hdc", "hdd", "fda", "fdb", "sd", "mtdblock", "pflash":
			if !hasProtocol(val) {
				drives = append(drives, DriveSpec{Path: val})
			}
		case "cdrom":
			if !hasProtocol(val) {
				drives = append(drives, DriveSpec{Path: val, ReadOnly: true})
			}
		case "device":
			kv, err := parseOpts(val, "driver")
			if err != nil {
				return cl, fmt.Errorf("qemu command line: -device %s: %w", val, err)
			}
			if d := kv["drive"]; d != "" && isOn(kv["share-rw"]) {
				shared[d] = true
			}
		case "name":
			kv, err := parseOpts(val, "guest")
			if err != nil {
				return cl, fmt.Errorf("qemu command line: -name %s: %w", val, err)
			}
			cl.Name = kv["guest"]
		case "chardev":
			kv, err := parseOpts(val, "backend")
			if err != nil {
				return cl, fmt.Errorf("qemu command line: -chardev %s: %w", val, err)
			}
			cl.ChardevIDs = append(cl.ChardevIDs, kv["id"])
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

func parseDrive(val string) (DriveSpec, bool, error) {
	kv, err := parseOpts(val, "")
	if err != nil {
		return DriveSpec{}, false, fmt.Errorf("qemu command line: -drive %s: %w", val, err)
	}
	path := kv["file"]
	if path == "" {
		path = kv["file.filename"]
	}
	if path == "" || hasProtocol(path) || (kv["file.driver"] != "" && kv["file.driver"] != "file" && kv["file.driver"] != "host_device") {
		return DriveSpec{}, false, nil
	}
	d := DriveSpec{ID: kv["id"], Path: path, Format: kv["format"]}
	if d.Format == "" {
		d.Format = kv["driver"]
	}
	if d.ID == "" {
		d.ID = kv["node-name"]
	}
	d.ReadOnly = isOn(kv["readonly"]) || isOn(kv["read-only"]) || kv["media"] == "cdrom"
	d.Backing = isOn(kv["snapshot"])
	return d, true, nil
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
		kv, err := parseOpts(val, "")
		if err != nil {
			return nil, fmt.Errorf("qemu command line: -blockdev %s: %w", val, err)
		}
		tree = map[string]any{}
		for k, v := range kv {
			m := tree
			parts := strings.Split(k, ".")
			for _, p := range parts[:len(parts)-1] {
				sub, ok := m[p].(map[string]any)
				if !ok {
					sub = map[string]any{}
					m[p] = sub
				}
				m = sub
			}
			m[parts[len(parts)-1]] = v
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
		if drv == "file" || drv == "host_device" || drv == "host_cdrom" {
			if p, _ := n["filename"].(string); p != "" && !hasProtocol(p) {
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

// hasProtocol reports whether QEMU reads a filename as "PROTOCOL:..." (an
// NBD, RBD, ... URL or json:{...}) rather than as a local file: the part
// before the first colon has no slash.
func hasProtocol(p string) bool {
	i := strings.IndexByte(p, ':')
	return i > 0 && !strings.Contains(p[:i], "/")
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

// parseOpts parses QEMU's "key=value,key=value" option syntax, where ",,"
// stands for a comma inside a value. A first element without "=" is the
// value of implied (an error if implied is "").
func parseOpts(s, implied string) (map[string]string, error) {
	kv := map[string]string{}
	var elems []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			elems = append(elems, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	elems = append(elems, cur.String())
	for i, e := range elems {
		k, v, ok := strings.Cut(e, "=")
		switch {
		case ok:
			kv[k] = v
		case i == 0 && implied != "":
			kv[implied] = e
		case e == "":
		default:
			// A bare flag ("readonly" alone means readonly=on).
			kv[e] = "on"
		}
	}
	return kv, nil
}
