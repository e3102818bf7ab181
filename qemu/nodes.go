package qemu

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/vmlock/vmlock/qmp"
)

// ImageInfo is QEMU's description of an image (QAPI ImageInfo), reduced to
// what matters for locking and jobs.
type ImageInfo struct {
	Filename              string `json:"filename"`
	Format                string `json:"format"`
	VirtualSize           int64  `json:"virtual-size"`
	ActualSize            int64  `json:"actual-size,omitempty"`
	DirtyFlag             bool   `json:"dirty-flag,omitempty"`
	BackingFilename       string `json:"backing-filename,omitempty"`
	FullBackingFilename   string `json:"full-backing-filename,omitempty"`
	BackingFilenameFormat string `json:"backing-filename-format,omitempty"`
	// BackingImage is the backing image's description; only present in
	// non-flat queries (query-block).
	BackingImage *ImageInfo `json:"backing-image,omitempty"`
	// FormatSpecific is the format's own description; see DataFile.
	FormatSpecific *struct {
		Type string `json:"type"`
		Data struct {
			DataFile string `json:"data-file,omitempty"`
		} `json:"data"`
	} `json:"format-specific,omitempty"`
}

// DataFile returns the external data file a qcow2 image keeps its guest
// data in (qemu-img create -o data_file=...), as its header names it
// (QEMU opens a relative name relative to its working directory), or "".
// The image file itself then holds only metadata: whoever writes the
// image writes the data file.
func (i ImageInfo) DataFile() string {
	if i.FormatSpecific == nil || i.FormatSpecific.Type != "qcow2" {
		return ""
	}
	return i.FormatSpecific.Data.DataFile
}

// NodeInfo is one block node as query-named-block-nodes reports it (QAPI
// BlockDeviceInfo), reduced to what matters for locking and jobs.
type NodeInfo struct {
	// Name is the node name; QEMU names nodes it opened implicitly
	// "#blockNNN".
	Name string `json:"node-name"`
	// Driver is the block driver: a format ("qcow2", "raw"), a protocol
	// ("file", "host_device", "nbd"), or a filter ("mirror_top",
	// "commit_top", "throttle", "blkdebug", ...).
	Driver string `json:"drv"`
	// Filename is QEMU's filename for the node: a path for nodes that sit
	// on a file, otherwise possibly a "json:{...}" pseudo-filename.
	Filename string `json:"file"`
	ReadOnly bool   `json:"ro"`
	// BackingFile is the full name of the backing file the node currently
	// uses, or "".
	BackingFile string    `json:"backing_file,omitempty"`
	Image       ImageInfo `json:"image"`
}

// Edge is a parent→child link in the block graph.
type Edge struct {
	// Role is the child's role: "backing", "file", "data-file", "image"
	// (blkdebug), "root" (a block backend's top node), or a job's role
	// ("main node", "source", "target", "intermediate node").
	Role string
	// Node is the node name at the other end of the link; for a parent
	// that is a block backend or a job, its name (possibly "").
	Node string
	// Kind is the other end's kind: "block-driver", "block-backend" or
	// "block-job".
	Kind string
}

// Node is a block node with its links.
type Node struct {
	NodeInfo
	// Children are the node's children (backing, file, ...).
	Children []Edge
	// Parents are the nodes, block backends and jobs that use this node.
	Parents []Edge
}

// Child returns the name of the child in role, or "".
func (n *Node) Child(role string) string {
	for _, e := range n.Children {
		if e.Role == role {
			return e.Node
		}
	}
	return ""
}

// Graph is a snapshot of QEMU's block graph.
type Graph struct {
	// Nodes maps node names to nodes.
	Nodes map[string]*Node
	// Exact reports whether links come from QEMU's graph
	// (x-debug-query-block-graph). If that command is unavailable, Exact
	// is false: backing links are then inferred from backing file names
	// and "file" links from equal filenames, and Parents hold only those.
	Exact bool
}

// IsProtocol reports whether the node's driver accesses storage directly
// (a "file", "host_device", "nbd", ... node) rather than interpreting an
// image format or filtering another node.
func (n *Node) IsProtocol() bool {
	switch n.Driver {
	case "file", "host_device", "host_cdrom", "nbd", "nfs", "iscsi", "iser", "rbd",
		"ssh", "http", "https", "ftp", "ftps", "gluster", "null-co", "null-aio",
		"nvme", "nvme-io_uring", "io_uring", "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa":
		return true
	}
	return false
}

// IsFilter reports whether the node's driver is a filter, which passes
// I/O through to one child: a job's "mirror_top" or "commit_top",
// "throttle", "copy-on-read", "blkdebug", ...
func (n *Node) IsFilter() bool {
	switch n.Driver {
	case "mirror_top", "commit_top", "throttle", "copy-on-read", "compress",
		"preallocate", "blkdebug", "blklogwrites", "blkverify", "copy-before-write",
		"snapshot-access":
		return true
	}
	return false
}

// ErrNoSuchNode is wrapped by errors about a node name the graph lacks.
var ErrNoSuchNode = errors.New("no such block node")

// ErrGraphUnreadable is wrapped by QueryNodes' error (so by QueryGraph's
// and Disks') when QEMU cannot be asked for its block nodes without
// crashing: QEMU 7.2 dies of SIGSEGV on query-named-block-nodes while a
// stream job that has ended waits to be dismissed (it was started with
// auto-dismiss=false), since the job still holds its copy-on-read filter
// node, which has lost its child. The nodes can be read again once the job
// is dismissed (JOB_STATUS_CHANGE to "null").
var ErrGraphUnreadable = errors.New("QEMU's block nodes cannot be read now")

// QueryNodes returns every named block node (query-named-block-nodes,
// flat). It asks for the jobs first (query-jobs) and fails with an error
// wrapping ErrGraphUnreadable, without asking for the nodes, while a
// stream job waits to be dismissed. A stream that ends between the two
// commands is not seen (QEMU gives no way to ask both at once): QEMU then
// crashes, and the call fails as its connection is lost.
func QueryNodes(ctx context.Context, c *qmp.Client) ([]NodeInfo, error) {
	jobs, err := QueryJobs(ctx, c)
	if err != nil {
		return nil, fmt.Errorf("qemu: listing block nodes: %w", err)
	}
	for _, j := range jobs {
		if j.Type == "stream" && j.Status == JobConcluded {
			return nil, fmt.Errorf("qemu: listing block nodes: %w: stream job %q has ended and waits to be dismissed (job-dismiss), and QEMU 7.2 crashes if asked for its block nodes then", ErrGraphUnreadable, j.ID)
		}
	}
	var nodes []NodeInfo
	if err := c.Execute(ctx, "query-named-block-nodes", map[string]bool{"flat": true}, &nodes); err != nil {
		return nil, fmt.Errorf("qemu: listing block nodes: %w", err)
	}
	return nodes, nil
}

type rawGraph struct {
	Nodes []struct {
		ID   uint64 `json:"id"`
		Type string `json:"type"`
		Name string `json:"name"`
	} `json:"nodes"`
	Edges []struct {
		Parent uint64 `json:"parent"`
		Child  uint64 `json:"child"`
		Name   string `json:"name"`
	} `json:"edges"`
}

// QueryGraph returns the block graph: every node (QueryNodes) linked by
// QEMU's own graph (x-debug-query-block-graph), or, where QEMU lacks that
// command, by links inferred from file names (see Graph.Exact). The two
// queries are not atomic: do not call QueryGraph while the graph changes
// (a job starting or finishing) if you need a consistent snapshot.
func QueryGraph(ctx context.Context, c *qmp.Client) (*Graph, error) {
	infos, err := QueryNodes(ctx, c)
	if err != nil {
		return nil, err
	}
	g := &Graph{Nodes: make(map[string]*Node, len(infos))}
	for _, info := range infos {
		g.Nodes[info.Name] = &Node{NodeInfo: info}
	}
	var raw rawGraph
	err = c.Execute(ctx, "x-debug-query-block-graph", nil, &raw)
	var qe *qmp.Error
	switch {
	case errors.As(err, &qe) && qe.Class == "CommandNotFound":
		g.infer()
		return g, nil
	case err != nil:
		return nil, fmt.Errorf("qemu: querying block graph: %w", err)
	}
	g.Exact = true
	type end struct{ name, kind string }
	ends := make(map[uint64]end, len(raw.Nodes))
	for _, n := range raw.Nodes {
		ends[n.ID] = end{n.Name, n.Type}
	}
	for _, e := range raw.Edges {
		p, c := ends[e.Parent], ends[e.Child]
		if pn := g.Nodes[p.name]; pn != nil && p.kind == "block-driver" {
			pn.Children = append(pn.Children, Edge{Role: e.Name, Node: c.name, Kind: c.kind})
		}
		if cn := g.Nodes[c.name]; cn != nil && c.kind == "block-driver" {
			cn.Parents = append(cn.Parents, Edge{Role: e.Name, Node: p.name, Kind: p.kind})
		}
	}
	return g, nil
}

// infer links nodes by file names when QEMU does not expose its graph.
func (g *Graph) infer() {
	names := make([]string, 0, len(g.Nodes))
	for name := range g.Nodes {
		names = append(names, name)
	}
	slices.Sort(names)
	link := func(parent, child *Node, role string) {
		parent.Children = append(parent.Children, Edge{Role: role, Node: child.Name, Kind: "block-driver"})
		child.Parents = append(child.Parents, Edge{Role: role, Node: parent.Name, Kind: "block-driver"})
	}
	for _, pn := range names {
		p := g.Nodes[pn]
		if p.IsProtocol() {
			continue
		}
		for _, cn := range names {
			c := g.Nodes[cn]
			switch {
			case c == p:
			case c.IsProtocol() && c.Filename == p.Filename && p.Child("file") == "":
				link(p, c, "file")
			case !c.IsProtocol() && p.BackingFile != "" && c.Filename == p.BackingFile && p.Child("backing") == "":
				link(p, c, "backing")
			}
		}
	}
}

// Chain returns the backing chain that starts at node top: top first, then
// its backing node, and so on down to the base. Filter nodes on the way
// (e.g. a job's "mirror_top" above the active layer, or a "throttle")
// are included as they are part of the chain QEMU reads through; a filter
// with only a "file" child is followed through that child.
func (g *Graph) Chain(top string) ([]*Node, error) {
	var chain []*Node
	seen := make(map[string]bool)
	for name := top; name != ""; {
		n := g.Nodes[name]
		if n == nil {
			return nil, fmt.Errorf("qemu: backing chain of %q: %w: %q", top, ErrNoSuchNode, name)
		}
		if seen[name] {
			return nil, fmt.Errorf("qemu: backing chain of %q has a loop at %q", top, name)
		}
		seen[name] = true
		chain = append(chain, n)
		next := n.Child("backing")
		if next == "" && n.IsFilter() {
			// A filter without a backing child reads through its file
			// (blkdebug: image) child.
			if next = n.Child("file"); next == "" {
				next = n.Child("image")
			}
		}
		name = next
	}
	return chain, nil
}

// Storage returns the protocol nodes (files, devices, NBD exports...) that
// node stores its own data in, following every link except "backing":
// for a qcow2 node, its "file" child (and "data-file", if any), through
// any filter such as blkdebug. A protocol node is its own storage.
func (g *Graph) Storage(node string) ([]*Node, error) {
	var out []*Node
	seen := make(map[string]bool)
	var walk func(name string) error
	walk = func(name string) error {
		n := g.Nodes[name]
		if n == nil {
			return fmt.Errorf("qemu: storage of %q: %w: %q", node, ErrNoSuchNode, name)
		}
		if seen[name] {
			return nil
		}
		seen[name] = true
		if n.IsProtocol() {
			out = append(out, n)
			return nil
		}
		for _, e := range n.Children {
			if e.Role == "backing" || e.Kind != "block-driver" {
				continue
			}
			if err := walk(e.Node); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(node); err != nil {
		return nil, err
	}
	return out, nil
}

// Roots returns the names of the nodes that no other node uses as a
// child, sorted: the tops of the graph's chains, i.e. the active layers
// (a node used by a block backend or a job only is a root). Protocol nodes
// are never roots unless nothing uses them.
func (g *Graph) Roots() []string {
	var roots []string
	for name, n := range g.Nodes {
		used := false
		for _, p := range n.Parents {
			used = used || p.Kind == "block-driver"
		}
		if !used {
			roots = append(roots, name)
		}
	}
	slices.Sort(roots)
	return roots
}

// BlockDevice is one block backend as query-block reports it: a drive or
// a device's disk, and the node tree inserted in it.
type BlockDevice struct {
	// Device is the backend's name ("" for backends created by -device
	// ...,drive=NODE or by blockdev-add'ed nodes attached to devices).
	Device string `json:"device"`
	// QDev is the guest device's id or QOM path, if any.
	QDev      string `json:"qdev,omitempty"`
	Removable bool   `json:"removable"`
	Locked    bool   `json:"locked"`
	// Inserted describes the medium: nil if the drive is empty.
	Inserted *struct {
		// NodeName is the top node of the backend's chain.
		NodeName string `json:"node-name"`
		Driver   string `json:"drv"`
		Filename string `json:"file"`
		ReadOnly bool   `json:"ro"`
		// Image includes the whole backing chain (BackingImage).
		Image ImageInfo `json:"image"`
	} `json:"inserted,omitempty"`
}

// QueryBlock returns QEMU's block backends (query-block).
func QueryBlock(ctx context.Context, c *qmp.Client) ([]BlockDevice, error) {
	var devs []BlockDevice
	if err := c.Execute(ctx, "query-block", nil, &devs); err != nil {
		return nil, fmt.Errorf("qemu: listing block devices: %w", err)
	}
	return devs, nil
}

// BlockdevAdd adds a block node tree (blockdev-add). options is the QAPI
// BlockdevOptions object, e.g. [Qcow2File].
func BlockdevAdd(ctx context.Context, c *qmp.Client, options any) error {
	if err := c.Execute(ctx, "blockdev-add", options, nil); err != nil {
		return fmt.Errorf("qemu: adding block node: %w", err)
	}
	return nil
}

// BlockdevDel removes a block node added with BlockdevAdd (blockdev-del);
// QEMU refuses while the node is in use.
func BlockdevDel(ctx context.Context, c *qmp.Client, node string) error {
	if err := c.Execute(ctx, "blockdev-del", map[string]string{"node-name": node}, nil); err != nil {
		return fmt.Errorf("qemu: removing block node %s: %w", node, err)
	}
	return nil
}

// Qcow2File returns blockdev-add options for a qcow2 image at path, named
// node, on a "file" protocol node named node+"-file". Its backing chain is
// opened by QEMU from the image headers (nodes named "#blockNNN"), or not
// at all if noBacking is set (then pass "backing": another node by editing
// the map).
func Qcow2File(node, path string, readOnly, noBacking bool) map[string]any {
	opts := map[string]any{
		"driver":    "qcow2",
		"node-name": node,
		"read-only": readOnly,
		"file": map[string]any{
			"driver":    "file",
			"node-name": node + "-file",
			"filename":  path,
			"read-only": readOnly,
		},
	}
	if noBacking {
		opts["backing"] = nil
	}
	return opts
}
