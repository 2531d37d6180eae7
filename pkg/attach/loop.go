package attach

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/quorum-csi/quorum-csi/pkg/attach/holder"
)

// fuse-loop: the volume is one file on a FUSE connection that this
// package serves itself (fuseconn.go), and a direct-I/O loop device
// sits on that file. The FUSE mount exists only while the loop device
// is set up: the loop device holds the file open, and with it the
// superblock and the connection, so the mount is detached (MNT_DETACH)
// right after, and nothing is left in the mount table. When the loop
// device goes (autoclear, once its last user closes it), the superblock
// dies, the connection ends and the readers read ENODEV.
//
// Takeover: with a StateFile, the connection's /dev/fuse descriptor is
// also kept by a descriptor holder (package holder), with the loop
// device held open beside it, and the state file says which loop device,
// which connection and what its INIT settled. When the serving process
// dies, the connection and the device live on in the holder, the
// device's users wait, and the next AttachFUSELoop with the same
// state file fetches the descriptor, checks that the loop device still
// sits on that connection's file, serves what waited and asks the kernel
// to resend what the dead process had read but not answered
// (FUSE_NOTIFY_RESEND, Linux 6.9). Those requests may thus be served
// twice: for block reads and writes of the same data that is harmless.
// The caller recovers the engine's write intent before Attach, so no
// request reaches an engine that has not recovered. The resend comes
// before our readers start: the kernel moves back every request read
// and not answered, and would take those our readers are serving too.

// FUSELoopOptions configure AttachFUSELoop.
type FUSELoopOptions struct {
	// StateDir holds the FUSE mount point while the device is set up;
	// made if missing.
	StateDir string
	// BlockSize is the loop device's logical block size: the largest
	// direct-I/O granularity of the volume's replicas. 512 if zero.
	BlockSize int64
	// StateFile, HolderDir and HolderSocket: see Options.
	StateFile    string
	HolderDir    string
	HolderSocket string
	// Readers is how many requests are served at once; defaultReaders
	// if zero.
	Readers int
	// Logf reports progress and waits during detach; nil discards.
	Logf func(format string, args ...any)
}

type fuseLoop struct {
	conn *fuseConn
	loop *os.File // held open: with autoclear the loop goes when we and all other users close it
	num  int
	id   loopID // the backing file, to tell our device from a later one with the same number
	logf func(string, ...any)
	// holderDir and holderSocket say where the device is kept;
	// stateFile and holderName are set while it is kept for a successor.
	holderDir    string
	holderSocket string
	stateFile    string
	holderName   string
	takenBack    bool
	released     bool
	// unkept is set while the device should be kept for a successor
	// but no holder took it (keep failed): Release tries again.
	unkept *unkeptDevice
}

// unkeptDevice is what keep needs to try again.
type unkeptDevice struct {
	opts FUSELoopOptions
	st   fuseLoopState
}

// loopID names a loop device's backing file (LOOP_GET_STATUS64's
// lo_device and lo_inode).
type loopID struct{ Device, Inode uint64 }

// errUnbound: the loop device has no backing file.
var errUnbound = errors.New("loop device is not bound")

// AttachFUSELoop serves vol through FUSE and puts a direct-I/O loop device
// on it, or takes back the device that opts.StateFile names. The loop
// device is set to clear itself when its last user closes it, so a
// killed process leaves no loop device behind once unused.
func AttachFUSELoop(ctx context.Context, vol Volume, opts FUSELoopOptions) (Device, error) {
	if opts.BlockSize == 0 {
		opts.BlockSize = 512
	}
	if opts.Readers == 0 {
		opts.Readers = defaultReaders
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if opts.StateFile != "" {
		fl, err := takeBackFUSELoop(vol, opts)
		if err != nil {
			return nil, err
		}
		if fl != nil {
			return fl, nil
		}
	}
	fl, err := newFUSELoop(ctx, vol, opts)
	if err != nil {
		return nil, err
	}
	return fl, nil
}

func newFUSELoop(ctx context.Context, vol Volume, opts FUSELoopOptions) (fl *fuseLoop, err error) {
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("attach: state folder: %w", err)
	}
	reapDeadMounts(opts.StateDir, opts.Logf)
	mnt, err := os.MkdirTemp(opts.StateDir, "fuse-")
	if err != nil {
		return nil, fmt.Errorf("attach: mount point: %w", err)
	}
	fl = &fuseLoop{num: -1, logf: opts.Logf, holderDir: opts.HolderDir, holderSocket: opts.HolderSocket}
	mounted := false
	defer func() {
		if mounted {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
		os.Remove(mnt)
		if err != nil {
			fl.ForceDetach()
		}
	}()
	fd, err := mountFUSE(mnt)
	if err != nil {
		return nil, fmt.Errorf("attach: %w", err)
	}
	mounted = true
	params, err := handshake(ctx, fd)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("attach: %w", err)
	}
	// Inode numbers of our files are ours to choose; a random one makes
	// the backing file's (device, inode) name this device alone, also
	// after the superblock's device number is reused.
	fs := &fileSystem{vol: vol, ino: 1<<32 + rand.Uint64N(1<<62)}
	if fl.conn, err = newFUSEConn(fd, fs, params, opts.Readers, opts.Logf); err != nil {
		return nil, fmt.Errorf("attach: %w", err)
	}
	// A bare descriptor: os.OpenFile would add it to Go's netpoller,
	// whose epoll_ctl asks the FUSE server (FUSE_POLL) from a thread the
	// runtime counts as running, and a garbage collection then waits for
	// that thread while the readers that would answer are stopped.
	backing, err := unix.Open(filepath.Join(mnt, fileName), unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("attach: open %s: %w", fileName, err)
	}
	defer unix.Close(backing) // the loop device holds its own reference
	if err := fl.setupLoop(ctx, backing, opts.BlockSize); err != nil {
		return nil, err
	}
	if fl.id, err = loopIdentity(fl.loop); err != nil {
		return nil, fmt.Errorf("attach: %s: %w", fl.Path(), err)
	}
	// Nothing needs the mount from here on, and a mount whose server is
	// gone while a holder keeps its connection would hang whoever looks
	// at it.
	if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
		return nil, fmt.Errorf("attach: detach the FUSE mount %s: %w", mnt, err)
	}
	mounted = false
	if opts.StateFile != "" {
		fl.keep(opts, fuseLoopState{Loop: fl.num, LoopDevice: fl.id.Device, LoopInode: fl.id.Inode, Size: vol.Size(), FUSE: params})
	}
	return fl, nil
}

// keep makes the device outlive this process: a holder gets the
// connection, then the state file says where it is. Failing that the
// device works but dies with the process, which is said.
func (fl *fuseLoop) keep(opts FUSELoopOptions, st fuseLoopState) {
	if !st.FUSE.canResend() {
		fl.logf("the kernel cannot resend what a dead FUSE server had taken (FUSE_NOTIFY_RESEND, Linux 6.9): %s dies with this process", fl.Path())
		return
	}
	st.Holder = fmt.Sprintf("%s@%d:%d", filepath.Base(opts.StateFile), unix.Major(st.LoopDevice), unix.Minor(st.LoopDevice))
	fl.unkept = &unkeptDevice{opts: opts, st: st}
	if err := fl.putHolder(st.Holder); err != nil {
		fl.logf("no descriptor holder keeps the FUSE connection of %s (%v): it dies with this process unless a holder takes it before", fl.Path(), err)
		return
	}
	if err := writeFUSELoopState(opts.StateFile, st); err != nil {
		fl.logf("%s dies with this process unless its state is written before: %v", fl.Path(), err)
		holder.Drop(opts.HolderDir, st.Holder)
		return
	}
	fl.stateFile, fl.holderName, fl.unkept = opts.StateFile, st.Holder, nil
}

// putHolder puts the connection into opts.HolderSocket, or, with none
// named, into a holder that answers in HolderDir, else into one it
// starts (holder-PROGRAM.sock: quorumctl's is holder-quorumctl.sock). A
// named holder may still be starting (a container beside us),
// and one that exits once empty refuses puts while it exits: it tries
// for a few seconds.
func (fl *fuseLoop) putHolder(name string) error {
	if fl.holderSocket == "" && fl.holderDir == "" {
		return errors.New("no holder folder")
	}
	// The holder keeps the loop device open as well: with autoclear it
	// would otherwise go when we die while nobody else has it open.
	var with []int
	if fl.loop != nil {
		with = append(with, int(fl.loop.Fd()))
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		socks := []string{fl.holderSocket}
		if fl.holderSocket == "" {
			socks = holder.Sockets(fl.holderDir)
		}
		var errs []error
		for _, sock := range socks {
			err := holder.Put(sock, name, fl.conn.fd, with...)
			if err == nil {
				return nil
			}
			errs = append(errs, err)
		}
		if time.Now().After(deadline) {
			return errors.Join(errs...)
		}
		if len(socks) == 0 {
			if err := os.MkdirAll(fl.holderDir, 0o700); err != nil {
				return fmt.Errorf("holder folder: %w", err)
			}
			if err := holder.Start(holder.Socket(fl.holderDir, programName())); err != nil {
				return err
			}
			continue
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// programName is this program's file name, which names the holder it
// starts.
func programName() string {
	exe, err := os.Executable()
	if err != nil {
		return "quorum"
	}
	return filepath.Base(exe)
}

// takeBackFUSELoop takes the device that opts.StateFile names back, or
// returns nil after removing a state file whose device or connection is
// gone. A state file it cannot read is an error.
func takeBackFUSELoop(vol Volume, opts FUSELoopOptions) (*fuseLoop, error) {
	st, err := readFUSELoopState(opts.StateFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("attach: %w", err)
	}
	dev := loopPath(st.Loop)
	forget := func(format string, args ...any) error {
		opts.Logf("cannot take back fuse-loop device %s: %s; making a new device", dev, fmt.Sprintf(format, args...))
		if err := removeState(opts.StateFile); err != nil {
			return fmt.Errorf("attach: %w", err)
		}
		return nil
	}
	if st.Size != vol.Size() {
		return nil, fmt.Errorf("attach: %s serves %d bytes, the volume has %d: it cannot be taken back (state file %s)", dev, st.Size, vol.Size(), opts.StateFile)
	}
	fd, _, err := holder.Get(opts.HolderDir, st.Holder)
	if errors.Is(err, holder.ErrNotHeld) {
		return nil, forget("no holder in %s keeps its FUSE connection (%v); if %s is still bound to that connection, it fails every request until its users close it and it clears itself", opts.HolderDir, err, dev)
	}
	if err != nil {
		return nil, fmt.Errorf("attach: take back %s: %w", dev, err)
	}
	if !fuseAlive(fd) {
		unix.Close(fd)
		holder.Drop(opts.HolderDir, st.Holder)
		return nil, forget("its FUSE connection has ended")
	}
	// Resent before any reader runs: the kernel moves back every request
	// read and not answered, ours too once we read.
	if err := resend(fd); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("attach: take back %s: %w", dev, err)
	}
	fl := &fuseLoop{num: st.Loop, id: st.loopID(), logf: opts.Logf, holderDir: opts.HolderDir, holderSocket: opts.HolderSocket, takenBack: true}
	fs := &fileSystem{vol: vol, ino: st.LoopInode}
	if fl.conn, err = newFUSEConn(fd, fs, st.FUSE, opts.Readers, opts.Logf); err != nil {
		return nil, fmt.Errorf("attach: take back %s: %w", dev, err)
	}
	// The device is looked at once the readers run, so that whatever the
	// kernel asks the server meanwhile is answered. The holder kept it
	// open, so it sits on this connection unless the state file lies.
	loop, id, err := openLoop(st.Loop, os.O_RDONLY)
	if err != nil || id != st.loopID() {
		fl.conn.stop(context.Background())
		fl.conn.close()
		holder.Drop(opts.HolderDir, st.Holder)
		if loop != nil {
			loop.Close()
		}
		if err == nil {
			err = fmt.Errorf("its backing file is device %d:%d inode %d", unix.Major(id.Device), unix.Minor(id.Device), id.Inode)
		}
		return nil, forget("it no longer sits on this volume's FUSE file (%v); the FUSE connection is closed", err)
	}
	fl.loop = loop
	if err := fl.putHolder(st.Holder); err != nil {
		opts.Logf("taking back %s: %v; it stays in the holder it was in", dev, err)
	}
	fl.stateFile, fl.holderName = opts.StateFile, st.Holder
	opts.Logf("took back fuse-loop device %s", dev)
	return fl, nil
}

func (fl *fuseLoop) setupLoop(ctx context.Context, backing int, blockSize int64) error {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	defer ctl.Close()
	cfg := unix.LoopConfig{
		Fd:   uint32(backing),
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

// loopIdentity returns the backing file of the loop device open as f.
// The kernel takes its inode number from the FUSE inode's cached
// attributes, which we let it keep forever: no request reaches the
// server, which may not run.
func loopIdentity(f *os.File) (loopID, error) {
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if errors.Is(err, unix.ENXIO) {
		return loopID{}, errUnbound
	}
	if err != nil {
		return loopID{}, fmt.Errorf("%s: %w", f.Name(), err)
	}
	return loopID{Device: info.Device, Inode: info.Inode}, nil
}

// openLoop opens /dev/loopN and returns its backing file.
func openLoop(n int, flag int) (*os.File, loopID, error) {
	f, err := os.OpenFile(loopPath(n), flag, 0)
	if err != nil {
		return nil, loopID{}, err
	}
	id, err := loopIdentity(f)
	if err != nil {
		f.Close()
		return nil, loopID{}, err
	}
	return f, id, nil
}

func (fl *fuseLoop) Path() string { return loopPath(fl.num) }

// bound reports whether our loop device still sits on our file.
func (fl *fuseLoop) bound() bool {
	if _, err := os.Stat(fmt.Sprintf("/sys/block/loop%d/loop", fl.num)); err != nil {
		return false
	}
	f, id, err := openLoop(fl.num, os.O_RDONLY)
	if err != nil {
		return false
	}
	// Ours may be the last close, which clears the device.
	f.Close()
	return id == fl.id
}

var errReleased = errors.New("released to another process")

func (fl *fuseLoop) Detach(ctx context.Context) error {
	if fl.released {
		return fmt.Errorf("detach %s: %w", fl.Path(), errReleased)
	}
	if fl.conn == nil {
		return nil
	}
	// Closing our handle and the holders' lets autoclear detach the
	// device as soon as its last user (a mount, a process) lets go.
	if fl.holderName != "" {
		if err := holder.Drop(fl.holderDir, fl.holderName); err != nil {
			return fmt.Errorf("detach %s: %w", fl.Path(), err)
		}
	}
	if fl.loop != nil {
		if err := fl.loop.Close(); err != nil {
			return fmt.Errorf("detach %s: %w", fl.Path(), err)
		}
		fl.loop = nil
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	start, lastLog := time.Now(), time.Now()
	for fl.num >= 0 && fl.bound() {
		if time.Since(lastLog) > 10*time.Second {
			fl.logf("waiting for %s to be released (mounted or open) for %s", fl.Path(), time.Since(start).Round(time.Second))
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			fl.keepAgain()
			return fmt.Errorf("detach %s: %w; it stays attached", fl.Path(), ErrBusy)
		case <-tick.C:
		}
	}
	// The loop device drops the FUSE file asynchronously after it
	// detaches; then the superblock dies and the readers read ENODEV.
	select {
	case <-fl.conn.done:
	case <-ctx.Done():
		return fmt.Errorf("detach %s: the FUSE connection did not end: %w", fl.Path(), ctx.Err())
	}
	fl.conn.close()
	fl.conn = nil
	// The device is gone; what is left to tidy is no reason to report
	// it still attached.
	if err := fl.forget(); err != nil {
		fl.logf("%v", err)
	}
	return nil
}

// keepAgain undoes the start of a detach that gave up: the device, still
// served, is held open and kept in a holder again.
func (fl *fuseLoop) keepAgain() {
	f, id, err := openLoop(fl.num, os.O_RDONLY)
	if err != nil || id != fl.id {
		if f != nil {
			f.Close()
		}
		return
	}
	fl.loop = f
	if fl.holderName != "" {
		if err := fl.putHolder(fl.holderName); err != nil {
			fl.logf("%s is no longer kept for a successor: %v", fl.Path(), err)
		}
	}
}

// forget drops the connection from the holders and removes the state
// file: nothing is left for a successor.
func (fl *fuseLoop) forget() error {
	var errs []error
	if fl.holderName != "" {
		errs = append(errs, holder.Drop(fl.holderDir, fl.holderName))
		fl.holderName = ""
	}
	if err := removeState(fl.stateFile); err != nil {
		errs = append(errs, err)
	}
	fl.stateFile = ""
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("detach %s: %w", fl.Path(), err)
	}
	return nil
}

// ForceDetach stops the readers, then closes every descriptor of the
// connection (ours and the holders'): the kernel aborts the connection
// and fails every request that waits, so the device's users get I/O
// errors and it clears itself once they close it.
func (fl *fuseLoop) ForceDetach() error {
	if fl.released {
		return fmt.Errorf("force detach %s: %w", fl.Path(), errReleased)
	}
	var errs []error
	if fl.conn != nil {
		fl.conn.stop(context.Background())
		if err := fl.forget(); err != nil {
			errs = append(errs, err)
		}
		fl.conn.close()
		fl.conn = nil
	}
	if fl.loop != nil {
		// Clearing a busy device defers it to its last close (autoclear).
		if err := unix.IoctlSetInt(int(fl.loop.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
			errs = append(errs, fmt.Errorf("clear %s: %w", fl.Path(), err))
		}
		fl.loop.Close()
		fl.loop = nil
	}
	return errors.Join(errs...)
}

// Release stops serving and leaves the device, its holder and its state
// file to the next attach: requests that arrive meanwhile wait in the
// kernel, and the holder keeps the device open.
func (fl *fuseLoop) Release(ctx context.Context) error {
	if fl.released {
		return nil
	}
	if fl.unkept != nil {
		// A holder that was away when the device was made (restarting,
		// say) may be back: without one the device dies with us.
		fl.keep(fl.unkept.opts, fl.unkept.st)
	}
	if fl.stateFile == "" {
		return fmt.Errorf("release %s: no holder keeps its FUSE connection (see the attach's log)", fl.Path())
	}
	if err := fl.conn.stop(ctx); err != nil {
		return fmt.Errorf("release %s: %w", fl.Path(), err)
	}
	fl.conn.close()
	if fl.loop != nil {
		fl.loop.Close()
		fl.loop = nil
	}
	fl.released = true
	return nil
}

func (fl *fuseLoop) TakenBack() bool { return fl.takenBack }

// reapDeadMounts removes FUSE mounts of attaches that died from the
// state folder: those of older versions, which served from a mount for
// the device's life, and one of an attach killed while it set its loop
// device up. Their connection is gone, so the mount point answers
// ENOTCONN at once; live attaches' mounts are left alone. No mount here
// ever has its connection in a holder (the mount is detached before the
// connection is handed to one), so none hangs a look at it.
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
