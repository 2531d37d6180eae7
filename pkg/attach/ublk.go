package attach

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/quorum-csi/quorum-csi/internal/atomicfile"
)

// ublk (Linux 6.4+, ublk_drv) serves a block device from user space
// through io_uring: /dev/ublkbN is the device, /dev/ublkcN its server
// side. Each queue's server thread keeps a FETCH command outstanding per
// tag; the kernel completes it with a request (its descriptor in a
// shared, read-only array), we do the I/O and answer with
// COMMIT_AND_FETCH, which also waits for the tag's next request.
//
// Why our own code, not github.com/semistrict/go-ublk (v0.2.0, the
// only Go library): it calls the handler synchronously in the queue's
// loop, one request at a time per queue, so a volume whose requests take
// a network round trip would see a queue depth of one per queue; and it
// has no user recovery commands. What the engine needs is small: eight
// control commands, two I/O commands and a loop that hands requests to
// goroutines and takes completions back. The loop is the part to own:
// requests run concurrently in goroutines, and their completions reach
// the queue's thread through an eventfd read that sits in the queue's own
// ring, so the thread sleeps in one io_uring_enter for both.
//
// User recovery: with UblkOptions.StateFile the device is made with
// UBLK_F_USER_RECOVERY and UBLK_F_USER_RECOVERY_REISSUE, and its id is
// kept in that file. If the serving process dies (a crash, SIGKILL, an
// upgrade of the node plugin), the kernel quiesces the device instead of
// removing it: its users' requests wait, and those the dead process had
// taken are queued again. The next AttachUblk with the same state file
// takes the device back (START_USER_RECOVERY, new queues,
// END_USER_RECOVERY) and serves the waiting requests, so a filesystem on
// it sees no error. A clean Detach removes the device and the file. Until
// an attach comes back, the device's users wait.
//
// Release is the planned way to the same state, for a handover to a new
// process. Linux 6.12 has no command for it (UBLK_U_CMD_QUIESCE_DEV came
// later, with UBLK_F_QUIESCE), so Release makes the kernel do what it
// does when a server dies, after answering what the server has in hand.
// What ublk_drv.c does, as read in the 6.12 stable series (the guest
// tests run 6.12.95): a queue's FETCH commands are cancelable
// io_uring commands. When the ring that carries them goes (its last
// file reference is closed, which a dying process does too), io_uring
// cancels them, and ublk's cancel function, at its first call for the
// queue (ublk_abort_requests), quiesces the disk's request queue, marks
// the queue canceling, so that new requests are requeued (with
// USER_RECOVERY) instead of handed out, and fails every request the
// server holds unanswered (ublk_abort_queue): with RECOVERY_REISSUE
// "failing" is a requeue, so nothing the server took and did not answer
// is lost. Then each FETCH still outstanding completes with
// UBLK_IO_RES_ABORT (ublk_cancel_cmd), and quiesce_work waits until no
// request is started and sets the device QUIESCED. A request dispatched
// just before the cancel, whose FETCH completes by task work on the
// queue's thread, is skipped by the cancel; the task work requeues it
// when that thread is exiting (or gone, the work then runs elsewhere),
// but would hand it to a server that no longer reads its ring if the
// thread were alive: the request would stay started and quiesce_work
// would wait forever. START_USER_RECOVERY moreover warns unless each old
// queue thread is exiting, and needs the character device closed. So
// Release stops handing out requests, answers those in hand, lets each
// queue's thread exit (a goroutine that ends locked to its thread takes
// the thread with it; the main thread, which cannot exit, never serves a
// queue), closes the rings only then, closes the character device, and
// waits for QUIESCED. The state file stays for the next attach.

const (
	ublkControl = "/dev/ublk-control"

	ublkCtrlCmdSize = 32
	ublkIOCmdSize   = 16
	ublkDescSize    = 24
	ublkMaxDepth    = 4096 // UBLK_MAX_QUEUE_DEPTH: sizes each queue's descriptor area

	ublkCmdAddDev        = 0x04
	ublkCmdDelDev        = 0x05
	ublkCmdStartDev      = 0x06
	ublkCmdStopDev       = 0x07
	ublkCmdSetParams     = 0x08
	ublkCmdGetInfo       = 0x02
	ublkCmdStartRecovery = 0x10
	ublkCmdEndRecovery   = 0x11
	ublkIOFetch          = 0x20
	ublkIOCommit         = 0x21

	ublkFlagIoctlEncode = 1 << 6
	ublkFlagRecovery    = 1 << 3
	ublkFlagReissue     = 1 << 4

	ublkStateDead     = 0
	ublkStateLive     = 1
	ublkStateQuiesced = 2

	ublkParamBasic   = 1 << 0
	ublkParamDiscard = 1 << 1
	ublkAttrVolatile = 1 << 2
	ublkAttrFUA      = 1 << 3

	ublkOpRead        = 0
	ublkOpWrite       = 1
	ublkOpFlush       = 2
	ublkOpDiscard     = 3
	ublkOpWriteZeroes = 5
	ublkFlagFUA       = 1 << 13

	ublkQueueDepth = 128
	ublkMaxIO      = 1 << 20

	// eventUserData marks the completion of the eventfd read that wakes a
	// queue's thread; tags are below it.
	eventUserData = 1 << 32
)

// ublkIoctl encodes a command as _IOWR('u', nr, size), as ublk wants it
// with UBLK_F_CMD_IOCTL_ENCODE.
func ublkIoctl(nr, size uint32) uint32 { return 3<<30 | size<<16 | 'u'<<8 | nr }

// UblkAvailable reports whether the kernel offers ublk as this package
// speaks it: the ioctl encoding of the commands (ublkIoctl) came with
// Linux 6.4; older kernels refuse every command.
func UblkAvailable() bool {
	if _, err := os.Stat(ublkControl); err != nil {
		return false
	}
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return false
	}
	var major, minor int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &major, &minor); err != nil {
		return false
	}
	return major > 6 || major == 6 && minor >= 4
}

// UblkOptions configure AttachUblk.
type UblkOptions struct {
	// BlockSize is the device's logical block size (512 or 4096): the
	// smallest request the volume takes.
	BlockSize int64
	// Queues is the number of hardware queues (default 1), each served
	// by its own thread.
	Queues int
	// StateFile, if set, keeps the device's id so that a later attach
	// with the same file takes a device left by a dead process back
	// (user recovery; see the package documentation). One file per
	// volume.
	StateFile string
	Logf      func(format string, args ...any)
}

type ublkDevice struct {
	vol    Volume
	id     uint32
	char   *os.File
	queues []*ublkQueue
	wg     sync.WaitGroup
	logf   func(string, ...any)

	ctrlMu   sync.Mutex // the control ring takes one command at a time
	ctrl     *ublkRing
	ctrlFile *os.File

	stateFile string
	takenBack bool // Attach recovered a device another process served

	// releasing makes the queue threads hand out no more requests and
	// exit once they answered those in hand; giveUp makes them exit at
	// once (Release's ctx ended).
	releasing, giveUp atomic.Bool

	stopOnce sync.Once
	stopErr  error
}

// AttachUblk serves vol as /dev/ublkbN.
func AttachUblk(ctx context.Context, vol Volume, opts UblkOptions) (_ Device, err error) {
	if opts.BlockSize == 0 {
		opts.BlockSize = 512
	}
	if opts.BlockSize&(opts.BlockSize-1) != 0 || opts.BlockSize < 512 || opts.BlockSize > 4096 {
		return nil, fmt.Errorf("ublk: block size %d: want a power of two from 512 to 4096", opts.BlockSize)
	}
	opts.Queues = max(opts.Queues, 1)
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	d := &ublkDevice{vol: vol, logf: opts.Logf, stateFile: opts.StateFile}
	if d.ctrlFile, err = os.OpenFile(ublkControl, os.O_RDWR, 0); err != nil {
		return nil, fmt.Errorf("ublk: %w (is ublk_drv loaded?)", err)
	}
	if d.ctrl, err = newUblkRing(4, true); err != nil {
		d.ctrlFile.Close()
		return nil, fmt.Errorf("ublk: %w", err)
	}
	recovering := false
	if d.stateFile != "" {
		if d.id, recovering, err = d.takeBack(ctx); err != nil {
			d.abandon()
			return nil, fmt.Errorf("ublk: %w", err)
		}
	}
	if !recovering {
		if err := d.add(opts); err != nil {
			d.abandon()
			return nil, err
		}
	}
	defer func() {
		if err == nil {
			return
		}
		if recovering {
			// Leave the device quiesced, its users waiting, for another
			// attempt: removing it would fail their requests.
			d.abandon()
		} else {
			d.stop()
		}
	}()
	charPath := fmt.Sprintf("/dev/ublkc%d", d.id)
	if err := waitPresent(ctx, charPath); err != nil {
		return nil, fmt.Errorf("ublk: %w", err)
	}
	if d.char, err = os.OpenFile(charPath, os.O_RDWR, 0); err != nil {
		return nil, fmt.Errorf("ublk: %w", err)
	}
	for q := range opts.Queues {
		uq, err := newUblkQueue(d, uint16(q))
		if err != nil {
			return nil, fmt.Errorf("ublk: queue %d: %w", q, err)
		}
		d.queues = append(d.queues, uq)
		ready := make(chan error, 1)
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			uq.run(ready)
		}()
		if err := <-ready; err != nil {
			return nil, fmt.Errorf("ublk: queue %d: %w", q, err)
		}
	}
	// START_DEV (END_USER_RECOVERY) waits until every tag of every queue
	// has a FETCH outstanding, then adds /dev/ublkbN (lets the waiting
	// requests through).
	if recovering {
		if err := d.control(ublkCmdEndRecovery, d.id, nil, uint64(os.Getpid())); err != nil {
			return nil, fmt.Errorf("ublk: end recovery of device %d: %w", d.id, err)
		}
		d.takenBack = true
		opts.Logf("took back ublk device %s from a process that died or released it", d.Path())
	} else if err := d.control(ublkCmdStartDev, d.id, nil, uint64(os.Getpid())); err != nil {
		return nil, fmt.Errorf("ublk: start device %d: %w", d.id, err)
	}
	if err := waitPresent(ctx, d.Path()); err != nil {
		return nil, fmt.Errorf("ublk: %w", err)
	}
	if d.stateFile != "" && !recovering {
		if err := atomicfile.WriteFile(d.stateFile, []byte(fmt.Sprintln(d.id)), 0o600); err != nil {
			return nil, fmt.Errorf("ublk: %w", err)
		}
	}
	opts.Logf("ublk device %s: %d queue(s) of depth %d, block size %d", d.Path(), opts.Queues, ublkQueueDepth, opts.BlockSize)
	return d, nil
}

// add makes a new device (ADD_DEV, SET_PARAMS).
func (d *ublkDevice) add(opts UblkOptions) error {
	// struct ublksrv_ctrl_dev_info (64 bytes); the kernel picks the id and
	// writes the info back.
	info := make([]byte, 64)
	putU16(info, 0, uint16(opts.Queues))
	putU16(info, 2, ublkQueueDepth)
	putU32(info, 8, ublkMaxIO)
	putU32(info, 12, 0xffffffff)
	flags := uint64(ublkFlagIoctlEncode)
	if d.stateFile != "" {
		flags |= ublkFlagRecovery | ublkFlagReissue
	}
	putU64(info, 24, flags)
	if err := d.control(ublkCmdAddDev, 0xffffffff, info, 0); err != nil {
		return fmt.Errorf("ublk: add device: %w", err)
	}
	d.id = *(*uint32)(unsafe.Pointer(&info[12]))

	// SET_PARAMS: header, then struct ublk_param_basic and
	// ublk_param_discard.
	shift := uint8(bits.TrailingZeros64(uint64(opts.BlockSize)))
	params := make([]byte, 8+32+20)
	putU32(params, 0, uint32(len(params)))
	putU32(params, 4, ublkParamBasic|ublkParamDiscard)
	putU32(params, 8, ublkAttrVolatile|ublkAttrFUA)
	params[12], params[13], params[14], params[15] = shift, 12, 12, shift
	putU32(params, 16, ublkMaxIO>>9)
	putU64(params, 24, uint64(d.vol.Size())>>9)
	putU32(params, 44, 4096)  // discard granularity
	putU32(params, 48, 1<<21) // max discard sectors (1 GiB)
	putU32(params, 52, 1<<21) // max write-zeroes sectors
	putU16(params, 56, 1)     // max discard segments
	if err := d.control(ublkCmdSetParams, d.id, params, 0); err != nil {
		d.control(ublkCmdDelDev, d.id, nil, 0)
		return fmt.Errorf("ublk: set parameters of device %d: %w", d.id, err)
	}
	return nil
}

// takeBack looks for the device named by the state file. One whose
// server died is quiesced: START_USER_RECOVERY readies it for new queues
// (recovering true). A device that is gone, or that cannot be recovered,
// is forgotten (deleted if it still exists), and a new one is made. One
// still served by a live process is an error.
func (d *ublkDevice) takeBack(ctx context.Context) (id uint32, recovering bool, err error) {
	b, err := os.ReadFile(d.stateFile)
	if errors.Is(err, os.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	if _, err := fmt.Sscan(string(b), &id); err != nil {
		return 0, false, fmt.Errorf("state file %s: %w", d.stateFile, err)
	}
	forget := func() error {
		if err := os.Remove(d.stateFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	// A process killed a moment ago still holds the device until the
	// kernel notices (it checks every few seconds).
	deadline := time.Now().Add(30 * time.Second)
	for {
		info := make([]byte, 64)
		err := d.control(ublkCmdGetInfo, id, info, 0)
		if errors.Is(err, unix.ENODEV) {
			return 0, false, forget()
		}
		if err != nil {
			return 0, false, fmt.Errorf("device %d: %w", id, err)
		}
		state := *(*uint16)(unsafe.Pointer(&info[4]))
		pid := *(*int32)(unsafe.Pointer(&info[16]))
		flags := *(*uint64)(unsafe.Pointer(&info[24]))
		switch {
		case flags&ublkFlagRecovery == 0 || state == ublkStateDead:
			if err := d.control(ublkCmdDelDev, id, nil, 0); err != nil && !errors.Is(err, unix.ENODEV) {
				return 0, false, fmt.Errorf("delete stale device %d: %w", id, err)
			}
			return 0, false, forget()
		case state == ublkStateLive && pid > 0 && unix.Kill(int(pid), 0) != unix.ESRCH:
			return 0, false, fmt.Errorf("/dev/ublkb%d of this volume is served by process %d", id, pid)
		case state == ublkStateQuiesced:
			err := d.control(ublkCmdStartRecovery, id, nil, 0)
			if err == nil {
				return id, true, nil
			}
			if !errors.Is(err, unix.EBUSY) {
				return 0, false, fmt.Errorf("start recovery of device %d: %w", id, err)
			}
		}
		if time.Now().After(deadline) {
			return 0, false, fmt.Errorf("/dev/ublkb%d (state %d) did not become recoverable within 30s", id, state)
		}
		select {
		case <-ctx.Done():
			return 0, false, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// control runs one control command on the device and waits for it.
func (d *ublkDevice) control(nr, id uint32, buf []byte, data uint64) error {
	d.ctrlMu.Lock()
	defer d.ctrlMu.Unlock()
	c := make([]byte, ublkCtrlCmdSize)
	putU32(c, 0, id)
	putU16(c, 4, 0xffff) // queue_id: none
	if buf != nil {
		putU16(c, 6, uint16(len(buf)))
		putU64(c, 8, uint64(uintptr(unsafe.Pointer(&buf[0]))))
	}
	putU64(c, 16, data)
	uringCmd(d.ctrl.next(), int(d.ctrlFile.Fd()), ublkIoctl(nr, ublkCtrlCmdSize), 0, c)
	if err := d.ctrl.enter(1); err != nil {
		return err
	}
	var res int32
	d.ctrl.reap(func(_ uint64, r int32) { res = r })
	runtime.KeepAlive(buf)
	if res < 0 {
		return unix.Errno(-res)
	}
	return nil
}

// waitPresent waits for a device node that the kernel is adding
// (devtmpfs makes it asynchronously).
func waitPresent(ctx context.Context, path string) error {
	for {
		_, err := os.Stat(path)
		if err == nil {
			return nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s did not appear: %w", path, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (d *ublkDevice) Path() string { return fmt.Sprintf("/dev/ublkb%d", d.id) }

// Detach waits until nobody holds the device (a mounted filesystem
// opens it exclusively, and so does our probe), then stops and removes
// it.
func (d *ublkDevice) Detach(ctx context.Context) error {
	for {
		f, err := os.OpenFile(d.Path(), os.O_RDONLY|unix.O_EXCL, 0)
		if err == nil {
			f.Close()
			break
		}
		if !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("ublk: detach %s: %w", d.Path(), err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("ublk: detach %s: %w", d.Path(), ErrBusy)
		case <-time.After(100 * time.Millisecond):
		}
	}
	return d.stop()
}

func (d *ublkDevice) ForceDetach() error { return d.stop() }

// stop removes the disk (STOP_DEV: the kernel fails new requests and
// aborts the outstanding FETCH commands, so the queue threads end once
// the requests they hold are answered), then deletes the device, which
// the kernel does once the server side is closed.
func (d *ublkDevice) stop() error {
	d.stopOnce.Do(func() {
		var errs []error
		if d.char != nil {
			if err := d.control(ublkCmdStopDev, d.id, nil, 0); err != nil {
				errs = append(errs, fmt.Errorf("stop device %d: %w", d.id, err))
			}
		}
		d.wg.Wait()
		for _, q := range d.queues {
			// A request goroutine may still be handing in its answer.
			q.handlers.Wait()
			q.close()
		}
		if d.char != nil {
			d.char.Close()
		}
		if err := d.control(ublkCmdDelDev, d.id, nil, 0); err != nil {
			errs = append(errs, fmt.Errorf("delete device %d: %w", d.id, err))
		}
		if d.stateFile != "" && len(errs) == 0 {
			if err := os.Remove(d.stateFile); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
		d.ctrl.close()
		d.ctrlFile.Close()
		if err := errors.Join(errs...); err != nil {
			d.stopErr = fmt.Errorf("ublk: %w", err)
		}
	})
	return d.stopErr
}

// abandon lets go of a device whose recovery failed without removing
// it, for the caller to exit: the kernel takes the queues back when the
// process ends (waiting here for their threads could wait forever, as
// nothing completes their commands).
func (d *ublkDevice) abandon() {
	d.stopOnce.Do(func() {
		d.ctrl.close()
		d.ctrlFile.Close()
	})
}

// ublkQueue is one hardware queue: a thread of its own (ublk takes a
// queue's commands only from the task that fetched first), a ring, the
// kernel's descriptor array and a buffer per tag.
type ublkQueue struct {
	d     *ublkDevice
	id    uint16
	descs []byte
	bufs  []byte
	efd   int
	evbuf [8]byte

	mu   sync.Mutex
	done []ublkResult // answered requests, for the queue thread to commit
	// spare is the queue thread's other done slice: the two swap at
	// every hand-over, so answering allocates nothing.
	spare    []ublkResult
	handlers sync.WaitGroup // request goroutines still running

	// Set by the queue's thread before it reports ready or ends, read
	// after d.wg.Wait: its thread id, and, when it ended for Release,
	// its ring (closed by Release once the thread is gone), the requests
	// it left unanswered (Release's ctx ended) and those it held back.
	tid              int
	ring             *ublkRing
	unanswered, held int
}

type ublkResult struct {
	tag uint16
	res int32
}

func newUblkQueue(d *ublkDevice, id uint16) (*ublkQueue, error) {
	q := &ublkQueue{d: d, id: id, efd: -1}
	descSize := (ublkQueueDepth*ublkDescSize + os.Getpagesize() - 1) &^ (os.Getpagesize() - 1)
	descOff := int64(id) * int64(ublkMaxDepth*ublkDescSize)
	var err error
	if q.descs, err = unix.Mmap(int(d.char.Fd()), descOff, descSize, unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return nil, fmt.Errorf("map descriptors: %w", err)
	}
	if q.bufs, err = unix.Mmap(-1, 0, ublkQueueDepth*ublkMaxIO, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
		q.close()
		return nil, fmt.Errorf("map buffers: %w", err)
	}
	if q.efd, err = unix.Eventfd(0, unix.EFD_CLOEXEC); err != nil {
		q.close()
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	return q, nil
}

func (q *ublkQueue) close() {
	if q.descs != nil {
		unix.Munmap(q.descs)
		q.descs = nil
	}
	if q.bufs != nil {
		unix.Munmap(q.bufs)
		q.bufs = nil
	}
	if q.efd >= 0 {
		unix.Close(q.efd)
		q.efd = -1
	}
}

func (q *ublkQueue) buf(tag uint16) []byte {
	return q.bufs[int(tag)*ublkMaxIO : int(tag+1)*ublkMaxIO]
}

// command queues FETCH or COMMIT_AND_FETCH for tag, writing its
// struct ublksrv_io_cmd straight into the entry: this runs once per
// request.
func (q *ublkQueue) command(r *ublkRing, nr uint32, tag uint16, result int32) {
	e := r.next()
	uringCmd(e, int(q.d.char.Fd()), ublkIoctl(nr, ublkIOCmdSize), uint64(tag), nil)
	putU16(e, 48, q.id)
	putU16(e, 50, tag)
	putU32(e, 52, uint32(result))
	putU64(e, 56, uint64(uintptr(unsafe.Pointer(&q.buf(tag)[0]))))
}

// armEvent queues a read of the eventfd, which completes when a request
// goroutine has an answer for the queue thread.
func (q *ublkQueue) armEvent(r *ublkRing) {
	e := r.next()
	e[0] = ringOpRead
	putU32(e, 4, uint32(q.efd))
	putU64(e, 8, ^uint64(0)) // no offset: the fd's own position
	putU64(e, 16, uint64(uintptr(unsafe.Pointer(&q.evbuf[0]))))
	putU32(e, 24, 8)
	putU64(e, 32, eventUserData)
}

// run serves the queue on a thread of its own that is never the
// process's main thread: Release needs the thread to exit, and the
// runtime cannot end the main thread (a goroutine that ends locked to
// it leaves it parked instead).
func (q *ublkQueue) run(ready chan<- error) {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// While this goroutine holds the main thread, the one started
		// here cannot be scheduled on it.
		done := make(chan struct{})
		go func() {
			defer close(done)
			q.run(ready)
		}()
		<-done
		runtime.UnlockOSThread()
		return
	}
	if q.serve(ready) {
		runtime.UnlockOSThread()
	}
	// Released: the goroutine ends locked to its thread, so the runtime
	// ends the thread, which is what ublk needs to see (see the package
	// documentation).
}

// serve is the queue's thread: it reports on ready once every tag has
// its FETCH outstanding, then runs until the device stops (true) or is
// released (false: the thread must exit, and the ring stays open in
// q.ring for Release to close after that).
func (q *ublkQueue) serve(ready chan<- error) (keepThread bool) {
	r, err := newUblkRing(2*ublkQueueDepth, false)
	if err != nil {
		ready <- err
		return true
	}
	q.tid = unix.Gettid()
	released := false
	defer func() {
		if released {
			q.ring = r
		} else {
			r.close()
		}
	}()
	for tag := range uint16(ublkQueueDepth) {
		q.command(r, ublkIOFetch, tag, 0)
	}
	q.armEvent(r)
	if err := r.enter(0); err != nil {
		ready <- err
		return true
	}
	ready <- nil
	live := ublkQueueDepth // tags with a command outstanding or a request in hand
	inHand := 0            // requests handed to goroutines, not yet committed
	held := 0              // requests taken while releasing, left for the kernel to requeue
	for live > 0 {
		if q.d.releasing.Load() && (inHand == 0 || q.d.giveUp.Load()) {
			// Hand in the answers queued by the last reap; the requests
			// still held, and with giveUp those in hand, the kernel
			// requeues when the ring goes.
			if err := r.enter(0); err != nil {
				q.d.logf("ublk queue %d: %v; the kernel requeues the requests whose answers it did not take", q.id, err)
			}
			released, q.unanswered, q.held = true, inHand, held
			return false
		}
		if err := r.enter(1); err != nil {
			q.d.logf("ublk queue %d: %v; the device stops serving", q.id, err)
			return true
		}
		r.reap(func(ud uint64, res int32) {
			switch {
			case ud == eventUserData:
				q.mu.Lock()
				done := q.done
				q.done = q.spare[:0]
				q.mu.Unlock()
				for _, a := range done {
					q.command(r, ublkIOCommit, a.tag, a.res)
				}
				inHand -= len(done)
				q.spare = done[:0]
				q.armEvent(r)
			case res == 0 && q.d.releasing.Load():
				held++
			case res == 0:
				// The descriptor is read here, by the thread, so that the
				// descriptor area can go when the thread ends even if
				// request goroutines outlive it (Release with giveUp).
				tag := uint16(ud)
				desc := q.descs[int(tag)*ublkDescSize:]
				opFlags := *(*uint32)(unsafe.Pointer(&desc[0]))
				n := int64(*(*uint32)(unsafe.Pointer(&desc[4]))) << 9
				off := int64(*(*uint64)(unsafe.Pointer(&desc[8]))) << 9
				inHand++
				q.handlers.Add(1)
				go q.handle(tag, opFlags, n, off)
			default:
				// UBLK_IO_RES_ABORT (-ENODEV) once the device stops;
				// anything else is a command the kernel refused.
				if res != -int32(unix.ENODEV) {
					q.d.logf("ublk queue %d tag %d: command failed: %v", q.id, ud, unix.Errno(-res))
				}
				live--
			}
		})
	}
	return true
}

// wake interrupts the queue thread's wait, so that it looks at the
// release flags.
func (q *ublkQueue) wake() {
	one := [8]byte{1}
	unix.Write(q.efd, one[:])
}

// handle serves one request (its descriptor's fields) and hands its
// result to the queue thread.
func (q *ublkQueue) handle(tag uint16, opFlags uint32, n, off int64) {
	defer q.handlers.Done()
	ctx := context.Background()
	var err error
	res := int32(0)
	switch opFlags & 0xff {
	case ublkOpRead:
		err = q.d.vol.ReadAt(ctx, q.buf(tag)[:n], off)
		res = int32(n)
	case ublkOpWrite:
		err = q.d.vol.WriteAt(ctx, q.buf(tag)[:n], off)
		if err == nil && opFlags&ublkFlagFUA != 0 {
			err = q.d.vol.Flush(ctx)
		}
		res = int32(n)
	case ublkOpFlush:
		err = q.d.vol.Flush(ctx)
	case ublkOpDiscard:
		err = q.d.vol.Discard(ctx, off, n)
	case ublkOpWriteZeroes:
		err = q.d.vol.WriteZeroes(ctx, off, n)
	default:
		res = -int32(unix.EOPNOTSUPP)
	}
	if err != nil {
		res = -int32(unix.EIO)
	}
	// Only the answer that makes the list non-empty wakes the thread:
	// the ones after it are taken with it, as the thread drains the list
	// only after reading the eventfd. A wake for a list already drained
	// costs a spurious drain, never a lost answer.
	q.mu.Lock()
	wake := len(q.done) == 0
	q.done = append(q.done, ublkResult{tag, res})
	q.mu.Unlock()
	if wake {
		q.wake()
	}
}

// Release hands the device over to a later AttachUblk with the same
// state file (see the package documentation): the queue threads hand out
// no more requests, answer those in hand and exit; then the rings and
// the character device close, the kernel requeues what was held back
// and quiesces the device, and Release waits for that. If ctx ends
// before the requests in hand are answered, the threads exit anyway and
// the kernel requeues those requests too, for the next attach to serve
// again (they are idempotent block requests); Release then says how
// many, and their buffers stay mapped for the rest of the process, as
// their goroutines may still write into them. The caller must not let
// the volume take new requests from elsewhere while they may still run.
func (d *ublkDevice) Release(ctx context.Context) error {
	if d.stateFile == "" {
		return fmt.Errorf("ublk: release %s: no state file, so no later attach could take it back", d.Path())
	}
	err := fmt.Errorf("ublk: release %s: already detached or released", d.Path())
	d.stopOnce.Do(func() {
		d.stopErr = fmt.Errorf("ublk: %s was released to another process", d.Path())
		err = d.release(ctx)
	})
	return err
}

func (d *ublkDevice) release(ctx context.Context) error {
	d.releasing.Store(true)
	for _, q := range d.queues {
		q.wake()
	}
	threads := make(chan struct{})
	go func() {
		d.wg.Wait()
		close(threads)
	}()
	select {
	case <-threads:
	case <-ctx.Done():
		d.giveUp.Store(true)
		for _, q := range d.queues {
			q.wake()
		}
		<-threads
	}
	var errs []error
	unanswered, held := 0, 0
	for _, q := range d.queues {
		if q.ring == nil {
			continue // its thread had stopped serving already and closed it
		}
		// The ring goes only once its thread is gone (see the package
		// documentation).
		if err := waitThreadGone(q.tid); err != nil {
			errs = append(errs, fmt.Errorf("queue %d: %w", q.id, err))
		}
		q.ring.close()
		q.ring = nil
		unanswered += q.unanswered
		held += q.held
		if q.unanswered == 0 {
			// Every answer was committed; a goroutine may still be
			// returning from handing its answer in.
			q.handlers.Wait()
			q.close()
		} else if q.descs != nil {
			// The descriptor mapping holds the character device open;
			// the buffers and the eventfd stay for the goroutines.
			unix.Munmap(q.descs)
			q.descs = nil
		}
	}
	if d.char != nil {
		d.char.Close()
	}
	// The kernel quiesces the device on its own once the rings are gone;
	// that takes milliseconds and waits for nothing of ours, hence a
	// fixed bound rather than ctx, which may have ended already.
	if err := d.waitQuiesced(30 * time.Second); err != nil {
		errs = append(errs, err)
	}
	d.ctrl.close()
	d.ctrlFile.Close()
	d.logf("released ublk device %s for another process to take back: %d request(s) held back and %d left unanswered, requeued by the kernel", d.Path(), held, unanswered)
	if unanswered > 0 {
		errs = append(errs, fmt.Errorf("%d request(s) in hand were left unanswered when the release's context ended: %w (the kernel requeued them for the next attach)", unanswered, ctx.Err()))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ublk: release %s: %w", d.Path(), err)
	}
	return nil
}

// waitThreadGone waits until the thread tid of this process has exited.
func waitThreadGone(tid int) error {
	path := fmt.Sprintf("/proc/self/task/%d", tid)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("thread %d still runs 10s after its queue ended", tid)
		}
	}
}

// waitQuiesced waits until the kernel reports the device QUIESCED.
func (d *ublkDevice) waitQuiesced(within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		info := make([]byte, 64)
		if err := d.control(ublkCmdGetInfo, d.id, info, 0); err != nil {
			return fmt.Errorf("device %d: %w", d.id, err)
		}
		state := *(*uint16)(unsafe.Pointer(&info[4]))
		if state == ublkStateQuiesced {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("device %d: state %d, not quiesced %v after its queues closed", d.id, state, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (d *ublkDevice) TakenBack() bool { return d.takenBack }
