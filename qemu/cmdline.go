package qemu

import (
	"cmp"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
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
	// Drives are the local image files the command line names, in order,
	// including those inside json:{...} pseudo-protocol filenames and
	// blkdebug:/blkverify: filenames. Other protocol URLs (nbd:, rbd:,
	// ...) name no local file and are not listed; neither are the files
	// of a filename ParseCommandLine does not understand (JSON that
	// encoding/json cannot read, a key given twice): QEMU reports those
	// once it has opened them.
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
// -snapshot, -name and -S, and the filenames QEMU reads as options:
// json:{...} and blkdebug:/blkverify: (see filenameTree). Options it does
// not know are skipped with their argument. It fails on an option without
// its argument and on -blockdev JSON it cannot parse.
func ParseCommandLine(args []string) (CommandLine, error) {
	var cl CommandLine
	snapshot := false
	shared := map[string]bool{}
	var drives []DriveSpec
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") || a == "-" {
			drives = append(drives, legacyDrive(a, false)...) // the implicit -hda
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
			drives = append(drives, parseDrive(val)...)
		case "blockdev":
			ds, err := parseBlockdev(val)
			if err != nil {
				return cl, err
			}
			drives = append(drives, ds...)
		case "hda", "hdb", "hdc", "hdd", "fda", "fdb", "sd", "mtdblock", "pflash":
			drives = append(drives, legacyDrive(val, false)...)
		case "cdrom":
			drives = append(drives, legacyDrive(val, true)...)
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

// legacyDrive lists the files of an image given as a whole option's
// argument (-hda, -cdrom, the positional image, ...): QEMU takes it as
// -drive file=VALUE, commas and all.
func legacyDrive(val string, cdrom bool) []DriveSpec {
	opts := "file=" + strings.ReplaceAll(val, ",", ",,")
	if cdrom {
		opts += ",media=cdrom"
	}
	return parseDrive(opts)
}

func parseDrive(val string) []DriveSpec {
	o := parseOpts(val, "")
	drv := o.get("file.driver")
	file := o.get("file")
	if strings.HasPrefix(file, "json:") || drv == "" && o.get("file.filename") == "" && hasFilterPrefix(file) {
		return parseDriveTree(o, file)
	}
	if drv != "" && !isLocalDriver(drv) {
		return nil // nbd, blkdebug...: see CommandLine.Drives
	}
	path, ok := o.get("file.filename"), true // an option of the driver: taken as it is
	if path == "" {
		path, ok = filenamePath(file, drv)
	}
	if !ok || path == "" {
		return nil
	}
	d := DriveSpec{ID: o.get("id"), Path: path, Format: cmp.Or(o.get("format"), o.get("driver"))}
	if isLocalDriver(d.Format) {
		d.Format = "raw" // the file is the top node: QEMU reads it as it is
	}
	if d.ID == "" {
		d.ID = o.get("node-name")
	}
	d.ReadOnly = driveReadOnly(o)
	d.Backing = o.all(isOn, "snapshot")
	return []DriveSpec{d}
}

// driveReadOnly reports whether a -drive opens its top node read-only.
func driveReadOnly(o options) bool {
	return o.all(isOn, "readonly", "read-only") || o.all(func(v string) bool { return v == "cdrom" }, "media")
}

// hasFilterPrefix reports whether a filename names QEMU's blkdebug or
// blkverify filter the legacy way.
func hasFilterPrefix(p string) bool {
	return strings.HasPrefix(p, "blkdebug:") || strings.HasPrefix(p, "blkverify:")
}

// parseDriveTree lists the files of a -drive whose filename QEMU reads as
// options (json:{...}) or as a filter over other filenames (blkdebug:,
// blkverify:). As QEMU does, the -drive's own options are laid over the
// filename's: a key given both ways takes the -drive's value, and the
// top node's read-only flag is always the -drive's.
func parseDriveTree(o options, file string) []DriveSpec {
	tree, ok := filenameTree(file, true)
	if !ok {
		return nil // QEMU's graph tells, once it has opened them
	}
	flat := map[string]any{}
	if !flatten(tree, "", flat) {
		return nil
	}
	for _, e := range o {
		switch e.key {
		case "file", "readonly", "read-only", "media", "snapshot", "id":
			// The filename itself, and options of the -drive, not of
			// its nodes.
		case "format":
			flat["driver"] = e.value
		default:
			flat[e.key] = e.value
		}
	}
	tree = unflatten(flat)
	tree["read-only"] = driveReadOnly(o)
	id, _ := tree["node-name"].(string)
	ds := treeFiles(tree, cmp.Or(o.get("id"), id), false)
	for i := range ds {
		ds[i].Backing = ds[i].Backing || o.all(isOn, "snapshot")
	}
	return ds
}

// filenameTree returns the node tree QEMU opens for a filename given the
// legacy way (no driver named), in -blockdev's nested form. json:{...}
// holds the options themselves (nested objects or dotted keys, as QEMU's
// qdict_flatten reads them); blkdebug:CONFIG:IMAGE and blkverify:RAW:IMAGE
// are the filter node over the images they name (CONFIG and RAW end at
// the first colon, so IMAGE is unambiguous); other filenames are a protocol
// node (see filenamePath): a local file, or a node of another driver with
// no local file. probed says that QEMU probes a format above a plain
// filename (-drive file=, blkverify's test image) rather than opening it as
// a protocol node (blkdebug's image, blkverify's raw image). ok is false
// for a filename vmlock does not understand: malformed JSON (including
// QEMU's single-quoted strings), a key given twice, an empty image.
func filenameTree(p string, probed bool) (tree map[string]any, ok bool) {
	if j, isJSON := strings.CutPrefix(p, "json:"); isJSON {
		var opts map[string]any
		if json.Unmarshal([]byte(j), &opts) != nil || opts == nil {
			return nil, false
		}
		flat := map[string]any{}
		if !flatten(opts, "", flat) {
			return nil, false
		}
		return unflatten(flat), true
	}
	proto, rest, hasProto := strings.Cut(p, ":")
	switch {
	case !hasProto || strings.Contains(proto, "/"):
		proto = "file" // a path
		fallthrough
	case isLocalDriver(proto):
		path, ok := filenamePath(p, "")
		if !ok {
			return nil, false
		}
		tree = map[string]any{"driver": proto, "filename": path}
	case proto == "blkdebug":
		_, image, ok := strings.Cut(rest, ":")
		if !ok {
			return nil, false
		}
		img, ok := filenameTree(image, false)
		if !ok {
			return nil, false
		}
		tree = map[string]any{"driver": proto, "image": img}
	case proto == "blkverify":
		raw, image, ok := strings.Cut(rest, ":")
		if !ok {
			return nil, false
		}
		r, rok := filenameTree(raw, false)
		t, tok := filenameTree(image, true)
		if !rok || !tok {
			return nil, false
		}
		tree = map[string]any{"driver": proto, "raw": r, "test": t}
	default:
		tree = map[string]any{"driver": proto} // nbd:, rbd:...: no local file
	}
	if probed {
		tree = map[string]any{"file": tree}
	}
	return tree, true
}

// flatten writes tree's leaves into flat under dotted keys, as QEMU's
// qdict_flatten does: a nested object's keys under "key.", a list's
// elements under "key.0", "key.1"...; empty objects and lists stay
// leaves. It returns false if two leaves get the same key (an object and
// a dotted key naming the same option): which one QEMU keeps depends on
// its hash table's order.
func flatten(tree map[string]any, prefix string, flat map[string]any) bool {
	for k, v := range tree {
		key := k
		if prefix != "" {
			key = prefix + "." + k
		}
		if l, ok := v.([]any); ok && len(l) > 0 {
			m := make(map[string]any, len(l))
			for i, e := range l {
				m[strconv.Itoa(i)] = e
			}
			v = m
		}
		if m, ok := v.(map[string]any); ok && len(m) > 0 {
			if !flatten(m, key, flat) {
				return false
			}
			continue
		}
		if _, dup := flat[key]; dup {
			return false
		}
		flat[key] = v
	}
	return true
}

// unflatten nests dotted keys into objects. A subtree outlives a scalar of
// its name ("file=node0" next to "file.filename=..."): QEMU refuses such
// options, and listing the file costs only a lock.
func unflatten(flat map[string]any) map[string]any {
	keys := make([]string, 0, len(flat))
	for k := range flat {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	tree := map[string]any{}
	for _, k := range keys {
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
		if _, sub := m[parts[len(parts)-1]].(map[string]any); !sub {
			m[parts[len(parts)-1]] = flat[k]
		}
	}
	return tree
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
		flat := map[string]any{}
		for _, e := range parseOpts(val, "") {
			flat[e.key] = e.value
		}
		tree = unflatten(flat)
	}
	id, _ := tree["node-name"].(string)
	return treeFiles(tree, id, true), nil
}

// treeFiles lists the local files of a block node tree in -blockdev's
// nested form, each with the id given. A file's Format is the format
// whose "file" child it is in, "" where QEMU probes the format (below a
// node that names no driver, through any filters), and "raw" where no
// format node is above it: QEMU reads such a file as it is (a -blockdev
// driver=file, a data-file), and probing it would read a format from data
// the guest wrote. Backing is set under a "backing" child, ReadOnly where
// a node on the way is read-only.
func treeFiles(tree map[string]any, id string, fromBlockdev bool) []DriveSpec {
	var out []DriveSpec
	var walk func(n map[string]any, format string, probed, backing, ro bool)
	walk = func(n map[string]any, format string, probed, backing, ro bool) {
		drv, _ := n["driver"].(string)
		ro = ro || isTrue(n["read-only"])
		if isLocalDriver(drv) {
			if format == "" && !probed {
				format = "raw"
			}
			// The driver is named, so QEMU takes the filename as it is, even
			// "nbd:x" (a relative path).
			if p, _ := n["filename"].(string); p != "" {
				out = append(out, DriveSpec{ID: id, Path: p, Format: format, ReadOnly: ro, Backing: backing, fromBlockdev: fromBlockdev})
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
			f, p, b := format, probed, backing
			switch {
			case k == "backing":
				f, p, b = "", false, true
			case isFormat(drv) && k == "file":
				f, p = drv, false
			case isFormat(drv):
				f, p = "", false // a data-file, an external data store
			case drv == "":
				// QEMU probes the format of a node that names no driver,
				// from its file.
				f, p = "", k == "file"
			}
			walk(sub, f, p, b, ro)
		}
	}
	walk(tree, "", false, false, false)
	return out
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
