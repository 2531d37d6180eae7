// Package attach turns a volume into a kernel block device, behind one
// interface (Device) with two frontends. ublk (ublk.go) is the fast path
// on kernels with ublk_drv: the kernel hands block requests to us through
// io_uring and /dev/ublkbN is the device. FUSE+loop works on every kernel
// with FUSE and loop: the volume is served as one file on a FUSE
// connection of our own (loop.go) and a loop device with direct I/O
// sits on that file. Either way every block request reaches the engine
// with no page cache in between, and with a state file a new process
// takes over a device that a dead or released one served, without an
// I/O error for its users.
package attach

import (
	"context"
	"errors"
	"fmt"

	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// Volume is what a frontend serves: the engine, which has the method set
// of one of its own children.
type Volume = quorum.Child

// Device is an attached volume.
type Device interface {
	// Path is the block device, e.g. /dev/loop3.
	Path() string
	// Detach removes the device once nobody has it open (a mounted
	// filesystem counts), waiting for that until ctx ends, and then
	// stops serving. On error the device is still attached and served.
	Detach(ctx context.Context) error
	// ForceDetach stops serving even while the device is in use; its
	// users get I/O errors from then on.
	ForceDetach() error
	// Release is the planned half of a handover to another process:
	// it stops taking requests, answers those in flight (until ctx
	// ends) and lets go of the device without removing it. The device's
	// users wait until a later Attach with the same StateFile takes it
	// back; a process that dies leaves the device in the same state.
	Release(ctx context.Context) error
	// TakenBack reports whether Attach took a device that another
	// process had served back instead of making a new one.
	TakenBack() bool
}

// ErrBusy is wrapped by Detach when the device stayed in use.
var ErrBusy = errors.New("device is in use")

// Frontends: how a volume becomes a block device.
const (
	FrontendAuto     = "auto" // ublk where UblkAvailable, else FUSE+loop
	FrontendUblk     = "ublk"
	FrontendFUSELoop = "fuse-loop"
)

// ResolveFrontend checks name ("" is auto) and resolves auto to the
// frontend this kernel offers.
func ResolveFrontend(name string) (string, error) {
	switch name {
	case "", FrontendAuto:
		if UblkAvailable() {
			return FrontendUblk, nil
		}
		return FrontendFUSELoop, nil
	case FrontendUblk, FrontendFUSELoop:
		return name, nil
	}
	return "", fmt.Errorf("frontend %q: want auto, ublk or fuse-loop", name)
}

// Options configure Attach.
type Options struct {
	// BlockSize is the device's logical block size.
	BlockSize int64
	// StateDir holds the FUSE mount point (fuse-loop).
	StateDir string
	// StateFile keeps what a later process needs to take the device
	// back (ublk: the device id; fuse-loop: the loop device and the FUSE
	// connection's parameters). One file per volume; empty: the device
	// dies with the process.
	StateFile string
	// HolderDir holds the sockets of FUSE descriptor holders (fuse-loop,
	// with StateFile): processes that keep the FUSE connection open while
	// no server runs, so that a new one can pick it up (package holder).
	// Without a holder that answers there the device dies with the
	// process, as without StateFile.
	HolderDir string
	// HolderSocket is the holder (in HolderDir) this process puts its
	// FUSE connections into: a deployment runs one beside the serving
	// process and names it. Empty: any live holder in HolderDir, one
	// started if none runs (this program again, see holder.Start).
	HolderSocket string
	// Logf receives progress messages.
	Logf func(format string, args ...any)
}

// Attach serves v as a block device with frontend (resolved, see
// ResolveFrontend).
func Attach(ctx context.Context, frontend string, v Volume, o Options) (Device, error) {
	switch frontend {
	case FrontendUblk:
		return AttachUblk(ctx, v, UblkOptions{BlockSize: o.BlockSize, StateFile: o.StateFile, Logf: o.Logf})
	case FrontendFUSELoop:
		return AttachFUSELoop(ctx, v, FUSELoopOptions{
			StateDir: o.StateDir, BlockSize: o.BlockSize, StateFile: o.StateFile,
			HolderDir: o.HolderDir, HolderSocket: o.HolderSocket, Logf: o.Logf,
		})
	}
	return nil, fmt.Errorf("attach: frontend %q is not ublk or fuse-loop", frontend)
}
