package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
)

// ErrImage is wrapped by BackingChain's errors when qemu-img cannot read
// an image (missing, unreadable, not an image of the given format).
var ErrImage = errors.New("cannot read image")

// BackingChain returns the backing chain of the image file at path, top
// first, as `qemu-img info --backing-chain` reads it from the image
// headers, without opening the images for writing and without regard to
// the locks QEMU holds on them (-U). format forces the top image's format
// ("" lets qemu-img probe it, as QEMU does). path is always read as a
// local file, never as a protocol URL. Every Filename in the result is
// absolute when path is.
//
// as, if not nil, is the identity qemu-img runs with: a daemon reading the
// images of a less privileged user reads them with that user's rights, so
// that a backing file named in an image header (which the user writes) can
// only be one the user could open itself.
func BackingChain(ctx context.Context, as *syscall.Credential, path, format string) ([]ImageInfo, error) {
	opts := "file.driver=file,file.filename=" + strings.ReplaceAll(path, ",", ",,")
	if format != "" {
		opts = "driver=" + format + "," + opts
	}
	cmd := exec.CommandContext(ctx, "qemu-img", "info", "--backing-chain", "--output=json", "-U", "--image-opts", opts)
	if as != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: as}
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("qemu-img info %s: %w", path, ctx.Err())
		}
		msg := strings.TrimSpace(stderr.String())
		var ee *exec.ExitError
		if errors.As(err, &ee) && msg != "" {
			return nil, fmt.Errorf("qemu-img info %s: %w: %s", path, ErrImage, strings.TrimPrefix(msg, "qemu-img: "))
		}
		return nil, fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	var chain []ImageInfo
	if err := json.Unmarshal(out, &chain); err != nil {
		return nil, fmt.Errorf("qemu-img info %s: decoding its output: %w", path, err)
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("qemu-img info %s: %w: empty backing chain", path, ErrImage)
	}
	return chain, nil
}
