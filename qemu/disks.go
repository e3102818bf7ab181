package qemu

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/vmlock/vmlock/qmp"
)

// Image is one image of a disk's backing chain in a running QEMU.
type Image struct {
	// Node is the image's format node (or a protocol node used as an
	// image directly, e.g. a raw file opened with driver=file).
	Node string
	// Path is the local file the image stores its data in, as QEMU names
	// it, or "" if it is not a local file (NBD, RBD, ...).
	Path string
	// DataFile is the local file a qcow2 image with an external data file
	// keeps its guest data in (its "data-file" child), or "": written
	// whenever the image is.
	DataFile string
	// Format is the node's driver ("qcow2", "raw", "file", ...).
	Format string
	// ReadOnly reports whether QEMU opened the node read-only (every
	// backing image is, until a job reopens it).
	ReadOnly bool
	// Size is the image's virtual size in bytes.
	Size int64
}

// Disk is one root of a running QEMU's block graph, with the images QEMU
// reads through it, active layer first. A mirror job's target is a root of
// its own, so it is a Disk while the job runs; so is a backup job's (the
// target child of the copy-before-write filter the job inserts). A node that a block backend
// or a block export uses is a Disk too, even where another node also uses
// it as a backing node: after a pivot, the old top nodes a user added
// (-blockdev, blockdev-add) stay in the graph, above the new active layer.
type Disk struct {
	// Name identifies the disk: its block backend's name (-drive id=),
	// else its guest device's id, else its block export's id, else its
	// active node's name. Only the last changes when a pivot replaces the
	// active layer.
	Name string
	// Device and QDev are the block backend's and the guest device's
	// names, if any; Export is the id of a block export that serves the
	// disk (the first by id if several do), if any.
	Device, QDev, Export string
	// Root is the root node; while a job runs on the disk it is the job's
	// filter node.
	Root string
	// Node is the active layer's node: the first node of the chain that
	// is not a filter.
	Node string
	// ReadOnly reports whether the active layer is read-only: QEMU writes
	// to no image of the disk.
	ReadOnly bool
	// ShareRW reports whether the guest device allows other writers
	// (share-rw=on).
	ShareRW bool
	// Images is the backing chain without filter nodes, active layer
	// first.
	Images []Image
	// Unused reports that nothing but block jobs uses the root node: no
	// block backend (a guest device, a -drive, a block export) and no
	// other node. A pivot (completing a mirror or an active commit)
	// replaces the job's source in its users, so on an unused disk it
	// replaces nothing. False where QEMU does not say (see Graph.Exact).
	Unused bool
}

// Disks returns every disk of a running QEMU, sorted by root node name
// (see Graph.Roots). It queries the block graph, the block backends, the
// block exports and, for disks attached to a guest device, the device's
// share-rw property. Like QueryGraph it is not atomic: do not call it
// while a job starts or ends if a consistent snapshot matters.
func Disks(ctx context.Context, c *qmp.Client) ([]Disk, error) {
	g, err := QueryGraph(ctx, c)
	if err != nil {
		return nil, err
	}
	devs, err := QueryBlock(ctx, c)
	if err != nil {
		return nil, err
	}
	exps, err := QueryBlockExports(ctx, c)
	if err != nil {
		return nil, err
	}
	backend := map[string]BlockDevice{}
	for _, d := range devs {
		if d.Inserted != nil {
			backend[d.Inserted.NodeName] = d
		}
	}
	export := map[string]string{} // node → export id
	for _, e := range exps {
		if cur, ok := export[e.NodeName]; !ok || e.ID < cur {
			export[e.NodeName] = e.ID
		}
	}
	// The roots, then the nodes a backend or an export uses that no
	// root's chain starts with (the active layer of a pivoted disk whose
	// old top nodes are still there).
	roots := g.Roots()
	heads := map[string]bool{} // each root's filters and first image
	head := func(root string) error {
		chain, err := g.Chain(root)
		for _, n := range chain {
			heads[n.Name] = true
			if !n.IsFilter() {
				break
			}
		}
		return err
	}
	for _, r := range roots {
		if err := head(r); err != nil {
			return nil, err
		}
	}
	used := slices.Sorted(maps.Keys(backend))
	used = append(used, slices.Sorted(maps.Keys(export))...)
	// A node a filter writes as its "target" child (the copy-before-write
	// filter of a backup job, or of image fleecing) is written by QEMU,
	// yet under a node parent: a disk of its own too.
	for _, n := range slices.Sorted(maps.Keys(g.Nodes)) {
		if slices.ContainsFunc(g.Nodes[n].Parents, func(e Edge) bool { return e.Kind == "block-driver" && e.Role == "target" }) {
			used = append(used, n)
		}
	}
	for _, n := range used {
		if g.Nodes[n] != nil && !heads[n] {
			roots = append(roots, n)
			if err := head(n); err != nil {
				return nil, err
			}
		}
	}
	slices.Sort(roots)
	var out []Disk
	for _, root := range roots {
		chain, err := g.Chain(root)
		if err != nil {
			return nil, err
		}
		d := Disk{Root: root}
		// A root of the graph has no node parents (Roots): only backends
		// and jobs. Another root has a backend or an export.
		d.Unused = g.Exact && !slices.ContainsFunc(g.Nodes[root].Parents, func(e Edge) bool { return e.Kind != "block-job" })
		for _, n := range chain {
			// query-block names the backend's top node, skipping the
			// implicit filter a job inserts; query-block-exports does not.
			if len(d.Images) == 0 {
				if b, ok := backend[n.Name]; ok {
					d.Device, d.QDev = b.Device, b.QDev
				}
				if id, ok := export[n.Name]; ok && d.Export == "" {
					d.Export = id
				}
			}
			if n.IsFilter() {
				continue
			}
			img := Image{Node: n.Name, Format: n.Driver, ReadOnly: n.ReadOnly, Size: n.Image.VirtualSize}
			if img.Path, img.DataFile, err = g.files(n); err != nil {
				return nil, err
			}
			d.Images = append(d.Images, img)
		}
		if len(d.Images) == 0 {
			continue // a filter over nothing: no image to lock
		}
		d.Node, d.ReadOnly = d.Images[0].Node, d.Images[0].ReadOnly
		switch {
		case d.Device != "":
			d.Name = d.Device
		case d.QDev != "":
			d.Name = d.QDev
		case d.Export != "":
			d.Name = d.Export
		default:
			d.Name = d.Node
		}
		if d.QDev != "" {
			var share bool
			if err := c.Execute(ctx, "qom-get", map[string]string{"path": d.QDev, "property": "share-rw"}, &share); err == nil {
				d.ShareRW = share
			} else if qe := (*qmp.Error)(nil); !errors.As(err, &qe) {
				return nil, fmt.Errorf("qemu: share-rw of %s: %w", d.QDev, err)
			}
		}
		out = append(out, d)
	}
	return out, nil
}

// files returns the local files image node n stores its data in: its
// image file, and a qcow2 image's external data file ("data-file" child;
// from the image's header where QEMU's graph is not exact). Either is ""
// if it is not a local file.
func (g *Graph) files(n *Node) (path, dataFile string, err error) {
	local := func(st []*Node) string {
		for _, s := range st {
			if s.Driver == "file" || s.Driver == "host_device" || s.Driver == "host_cdrom" {
				return s.Filename
			}
		}
		return ""
	}
	var data []*Node
	if dn := n.Child("data-file"); dn != "" {
		if data, err = g.Storage(dn); err != nil {
			return "", "", err
		}
		dataFile = local(data)
	} else if !g.Exact {
		dataFile = n.Image.DataFile()
	}
	st, err := g.Storage(n.Name)
	if err != nil {
		return "", "", err
	}
	st = slices.DeleteFunc(st, func(s *Node) bool { return slices.Contains(data, s) })
	return local(st), dataFile, nil
}

// BlockExport is one block export as query-block-exports reports it.
type BlockExport struct {
	ID   string `json:"id"`
	Type string `json:"type"` // "nbd", "fuse", "vhost-user-blk"
	// NodeName is the node the export serves; while a job runs on it,
	// the job's filter node.
	NodeName     string `json:"node-name"`
	ShuttingDown bool   `json:"shutting-down"`
}

// QueryBlockExports returns QEMU's block exports (query-block-exports);
// none on a QEMU older than 5.2, which lacks the command.
func QueryBlockExports(ctx context.Context, c *qmp.Client) ([]BlockExport, error) {
	var exps []BlockExport
	err := c.Execute(ctx, "query-block-exports", nil, &exps)
	var qe *qmp.Error
	switch {
	case errors.As(err, &qe) && qe.Class == "CommandNotFound":
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("qemu: listing block exports: %w", err)
	}
	return exps, nil
}
