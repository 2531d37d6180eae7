package attach

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// FUSELoopOptions configure AttachFUSELoop.
type FUSELoopOptions struct {
	// StateDir holds the private FUSE mount point; made if missing.
	StateDir string
	// BlockSize is the loop device's logical block size: the largest
	// direct-I/O granularity of the volume's replicas. 512 if zero.
	BlockSize int64
	// Logf reports waits during detach; nil discards.
	Logf func(format string, args ...any)
}

type fuseLoop struct {
	server *fuse.Server
	mnt    string
	loop   *os.File // held open: with autoclear the loop goes when we and all other users close it
	num    int
	logf   func(string, ...any)
}

// AttachFUSELoop serves vol through FUSE and puts a direct-I/O loop device
// on it. The loop device is set to clear itself when its last user closes
// it, so a killed process leaves no loop device behind once unused.
func AttachFUSELoop(ctx context.Context, vol Volume, opts FUSELoopOptions) (d Device, err error) {
	if opts.BlockSize == 0 {
		opts.BlockSize = 512
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("attach: state folder: %w", err)
	}
	reapDeadMounts(opts.StateDir, opts.Logf)
	mnt, err := os.MkdirTemp(opts.StateDir, "fuse-")
	if err != nil {
		return nil, fmt.Errorf("attach: mount point: %w", err)
	}
	fl := &fuseLoop{mnt: mnt, num: -1, logf: opts.Logf}
	defer func() {
		if err != nil {
			fl.ForceDetach()
		}
	}()
	fl.server, err = fuse.NewServer(newFileSystem(vol), mnt, &fuse.MountOptions{
		FsName:            "quorum",
		Name:              "quorum",
		DirectMount:       true,
		DirectMountStrict: true,
		MaxWrite:          1 << 20,
		// Loop submits up to its queue depth of requests at once; each
		// direct request is a background request for FUSE.
		MaxBackground:     128,
		ExtraCapabilities: fuse.CAP_ASYNC_DIO,
		DisableXAttrs:     true,
		// Read data is already in go-fuse's reply buffer; splicing it
		// through a pipe would only copy it again (and 1 MiB plus the
		// header does not fit a default pipe).
		DisableSplice: true,
	})
	if err != nil {
		return nil, fmt.Errorf("attach: mount FUSE at %s: %w", mnt, err)
	}
	go fl.server.Serve()
	if err := fl.server.WaitMount(); err != nil {
		return nil, fmt.Errorf("attach: mount FUSE at %s: %w", mnt, err)
	}
	backing, err := os.OpenFile(filepath.Join(mnt, fileName), os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		return nil, fmt.Errorf("attach: open %s: %w", fileName, err)
	}
	defer backing.Close() // the loop device holds its own reference
	if err := fl.setupLoop(ctx, backing, opts.BlockSize); err != nil {
		return nil, err
	}
	return fl, nil
}

func (fl *fuseLoop) setupLoop(ctx context.Context, backing *os.File, blockSize int64) error {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	defer ctl.Close()
	cfg := unix.LoopConfig{
		Fd:   uint32(backing.Fd()),
		Size: uint32(blockSize),
		Info: unix.LoopInfo64{Flags: unix.LO_FLAGS_DIRECT_IO | unix.LO_FLAGS_AUTOCLEAR},
	}
	// Another process may take the free device between our query and our
	// configure; then ask again.
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("attach: %w", err)
		}
		num, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return fmt.Errorf("attach: find a free loop device: %w", err)
		}
		dev, err := os.OpenFile(loopPath(num), os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("attach: %w", err)
		}
		err = unix.IoctlLoopConfigure(int(dev.Fd()), &cfg)
		if errors.Is(err, unix.EBUSY) && attempt < 10 {
			dev.Close()
			continue
		}
		if err != nil {
			dev.Close()
			return fmt.Errorf("attach: configure %s: %w", loopPath(num), err)
		}
		fl.loop, fl.num = dev, num
		break
	}
	dio, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/dio", fl.num))
	if err != nil {
		return fmt.Errorf("attach: check direct I/O of %s: %w", fl.Path(), err)
	}
	if strings.TrimSpace(string(dio)) != "1" {
		return fmt.Errorf("attach: %s refused direct I/O on the FUSE file", fl.Path())
	}
	return nil
}

func loopPath(n int) string { return "/dev/loop" + strconv.Itoa(n) }

func (fl *fuseLoop) Path() string { return loopPath(fl.num) }

// loopBound reports whether our loop device still has a backing file.
func (fl *fuseLoop) loopBound() bool {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/backing_file", fl.num))
	return err == nil && strings.Contains(string(b), fl.mnt)
}

func (fl *fuseLoop) Detach(ctx context.Context) error {
	if fl.loop != nil {
		// Closing our handle lets autoclear detach the device as soon as
		// its last user (a mount, a process) lets go.
		if err := fl.loop.Close(); err != nil {
			return fmt.Errorf("detach %s: %w", fl.Path(), err)
		}
		fl.loop = nil
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	start, lastLog := time.Now(), time.Now()
	for fl.num >= 0 && fl.loopBound() {
		if time.Since(lastLog) > 10*time.Second {
			fl.logf("waiting for %s to be released (mounted or open) for %s", fl.Path(), time.Since(start).Round(time.Second))
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("detach %s: %w; it stays attached", fl.Path(), ErrBusy)
		case <-tick.C:
		}
	}
	// The loop device drops the FUSE file asynchronously after it
	// detaches; the unmount succeeds once the file is released.
	for {
		err := fl.server.Unmount()
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("detach: unmount FUSE at %s: %w", fl.mnt, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("detach: unmount FUSE at %s: %w", fl.mnt, err)
		case <-tick.C:
		}
	}
	fl.server.Wait()
	return os.Remove(fl.mnt)
}

func (fl *fuseLoop) ForceDetach() error {
	var errs []error
	if fl.loop != nil {
		// Clearing a busy device defers it to its last close (autoclear).
		if err := unix.IoctlSetInt(int(fl.loop.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
			errs = append(errs, fmt.Errorf("clear %s: %w", fl.Path(), err))
		}
		fl.loop.Close()
		fl.loop = nil
	}
	if fl.server != nil {
		if err := fl.server.Unmount(); err != nil {
			// Lazy unmount: users of the loop device see errors, but no
			// mount is left in the table.
			if lerr := syscall.Unmount(fl.mnt, syscall.MNT_DETACH); lerr != nil {
				errs = append(errs, fmt.Errorf("unmount FUSE at %s: %w", fl.mnt, lerr))
			}
		}
	}
	if err := os.Remove(fl.mnt); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// reapDeadMounts removes the FUSE mounts of attaches that died (killed,
// crashed) from the state folder: their connection is gone, so the mount
// point answers ENOTCONN. Live attaches' mounts are left alone.
func reapDeadMounts(stateDir string, logf func(string, ...any)) {
	dirs, _ := filepath.Glob(filepath.Join(stateDir, "fuse-*"))
	for _, d := range dirs {
		_, err := os.Stat(filepath.Join(d, fileName))
		switch {
		case errors.Is(err, syscall.ENOTCONN):
			if uerr := syscall.Unmount(d, syscall.MNT_DETACH); uerr != nil {
				logf("cannot unmount the dead FUSE mount %s: %v", d, uerr)
				continue
			}
			logf("unmounted the FUSE mount %s of an attach that died", d)
		case errors.Is(err, os.ErrNotExist):
			// An empty mount point left by a crash before mounting.
		default:
			continue
		}
		os.Remove(d)
	}
}

func (fl *fuseLoop) Release(ctx context.Context) error {
	return errors.New("fuse-loop: release: not implemented yet")
}

func (fl *fuseLoop) TakenBack() bool { return false }
