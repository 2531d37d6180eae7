package attach

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/quorum-csi/quorum-csi/internal/alignbuf"
)

// A FUSE connection lives as long as some process holds an open file
// description of its /dev/fuse. Our readers all share the one
// description the mount was made with, never clones
// (FUSE_DEV_IOC_CLONE): the kernel fails the requests a clone had read
// when the clone is closed, while a description that a holder process
// also has stays open, with what it had read, when we die; the next
// server asks for those again (notifyResend).

const (
	fuseMaxWrite = 1 << 20
	// Loop submits up to its queue depth of requests at once; each direct
	// request is a background request for FUSE.
	fuseMaxBackground = 128
	// defaultReaders is how many requests are served at once: each reader
	// calls the engine inline.
	defaultReaders = 32

	// dataAt is where a reader's data starts in its buffer; requests are
	// read at reqAt so that a WRITE's data lands there.
	dataAt = alignbuf.Align
	reqAt  = dataAt - inHeaderSize - writeInSize
)

// fuseParams are what the connection's INIT settled. The kernel sends
// INIT once per connection, so a server that takes a connection over
// reads them from the device's state file.
type fuseParams struct {
	// KernelMinor and KernelFlags are what the kernel offered.
	KernelMinor         uint32 `json:"kernelMinor"`
	KernelFlags         uint64 `json:"kernelFlags"`
	Minor               uint32 `json:"minor"`
	Flags               uint64 `json:"flags"`
	MaxReadahead        uint32 `json:"maxReadahead"`
	MaxWrite            uint32 `json:"maxWrite"`
	MaxPages            uint16 `json:"maxPages"`
	MaxBackground       uint16 `json:"maxBackground"`
	CongestionThreshold uint16 `json:"congestionThreshold"`
}

// canResend reports whether the kernel takes notifyResend (Linux 6.9).
func (p fuseParams) canResend() bool { return p.KernelFlags&initHasResend != 0 }

// reader is one reader's memory. A request is read at buf[reqAt:], so
// that a WRITE's data and a READ's answer start at buf[dataAt], page
// aligned: replicas opened with O_DIRECT take them without a bounce
// copy. Small answers are built in out.
type reader struct {
	buf []byte
	out [outHeaderSize + 256]byte
}

func newReader(maxWrite uint32) *reader {
	n := max(dataAt+int(maxWrite), reqAt+minReadBuffer)
	return &reader{buf: alignbuf.Make(n, 0)}
}

func (r *reader) request() []byte { return r.buf[reqAt:] }

func (r *reader) data(n int) []byte { return r.buf[dataAt : dataAt+n] }

// mountFUSE mounts a new FUSE file system at mnt and returns its
// /dev/fuse descriptor, non-blocking.
func mountFUSE(mnt string) (int, error) {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/fuse: %w", err)
	}
	opts := fmt.Sprintf("fd=%d,rootmode=40000,user_id=%d,group_id=%d", fd, os.Getuid(), os.Getgid())
	if err := unix.Mount("quorum", mnt, "fuse.quorum", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("mount FUSE at %s: %w", mnt, err)
	}
	return fd, nil
}

// handshake answers the INIT that the kernel sends on a new connection
// before anything else.
func handshake(ctx context.Context, fd int) (fuseParams, error) {
	r := newReader(0)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var n int
	for {
		var err error
		n, err = unix.Read(fd, r.request())
		if err == nil {
			break
		}
		if err != unix.EAGAIN && err != unix.EINTR {
			return fuseParams{}, fmt.Errorf("read FUSE INIT: %w", err)
		}
		if ctx.Err() != nil {
			return fuseParams{}, fmt.Errorf("no FUSE INIT: %w", ctx.Err())
		}
		unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 100)
	}
	h, args, err := parseRequest(r.request()[:n])
	if err != nil {
		return fuseParams{}, err
	}
	if h.Opcode != opInit {
		return fuseParams{}, fmt.Errorf("fuse: first request has opcode %d, want INIT", h.Opcode)
	}
	in, err := parseInitIn(args)
	if err != nil {
		return fuseParams{}, err
	}
	if in.Major != fuseMajor || in.Minor < 23 {
		return fuseParams{}, fmt.Errorf("fuse: kernel speaks protocol %d.%d, want %d.23 or later", in.Major, in.Minor, fuseMajor)
	}
	p := fuseParams{
		KernelMinor:         in.Minor,
		KernelFlags:         in.Flags,
		Minor:               min(in.Minor, fuseMinor),
		Flags:               in.Flags & (initAsyncRead | initBigWrites | initAsyncDIO | initMaxPages),
		MaxReadahead:        in.MaxReadahead,
		MaxWrite:            fuseMaxWrite,
		MaxPages:            fuseMaxWrite / 4096,
		MaxBackground:       fuseMaxBackground,
		CongestionThreshold: fuseMaxBackground * 3 / 4,
	}
	out := initOut{
		Major: fuseMajor, Minor: p.Minor, MaxReadahead: p.MaxReadahead, Flags: p.Flags,
		MaxBackground: p.MaxBackground, CongestionThreshold: p.CongestionThreshold,
		MaxWrite: p.MaxWrite, TimeGran: 1, MaxPages: p.MaxPages,
	}
	msg := r.out[:outHeaderSize+out.put(r.out[outHeaderSize:])]
	putOutHeader(msg, len(msg), 0, h.Unique)
	if _, err := unix.Write(fd, msg); err != nil {
		return fuseParams{}, fmt.Errorf("answer FUSE INIT: %w", err)
	}
	return p, nil
}

// errStopped ends the readers of a connection that was stopped.
var errStopped = errors.New("fuse: stopped")

// testHookServe, when set, sees each request before it is served; true
// makes its reader return without answering, as the reader of a process
// that dies would.
var testHookServe func(h inHeader, args []byte) bool

// fuseConn serves one FUSE connection with a fixed set of readers. Each
// reads a request, calls the volume and writes the answer; while nothing
// is to be read, one of them waits in poll for the connection and for
// the stop eventfd.
type fuseConn struct {
	fd       int // /dev/fuse, non-blocking
	stopFD   int // eventfd, readable once stop was called
	fs       *fileSystem
	params   fuseParams
	logf     func(string, ...any)
	stopping atomic.Bool
	// pollMu lets one reader at a time wait in poll: each new request
	// would wake every waiter, and all but one would find nothing to read.
	pollMu  sync.Mutex
	readers sync.WaitGroup
	done    chan struct{} // closed once every reader returned

	endMu  sync.Mutex
	endErr error // why the first reader returned

	resent sync.Once
}

// newFUSEConn serves fd with n readers; it takes fd, which close
// closes.
func newFUSEConn(fd int, fs *fileSystem, p fuseParams, n int, logf func(string, ...any)) (*fuseConn, error) {
	// O_NONBLOCK belongs to the open file description, which holders
	// share; they never read it.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("fuse: %w", err)
	}
	stopFD, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("fuse: eventfd: %w", err)
	}
	c := &fuseConn{fd: fd, stopFD: stopFD, fs: fs, params: p, logf: logf, done: make(chan struct{})}
	c.readers.Add(n)
	for range n {
		go c.read(newReader(c.params.MaxWrite))
	}
	go func() {
		c.readers.Wait()
		close(c.done)
	}()
	return c, nil
}

func (c *fuseConn) read(r *reader) {
	defer c.readers.Done()
	for {
		if c.stopping.Load() {
			c.end(errStopped)
			return
		}
		n, err := unix.Read(c.fd, r.request())
		if err == unix.EAGAIN {
			n, err = c.waitRead(r)
		}
		switch {
		case err == nil:
			if !c.serve(r, n) {
				return
			}
		case err == unix.EINTR:
		default:
			c.end(err)
			return
		}
	}
}

// waitRead waits for a request and reads it.
func (c *fuseConn) waitRead(r *reader) (int, error) {
	c.pollMu.Lock()
	defer c.pollMu.Unlock()
	fds := []unix.PollFd{{Fd: int32(c.fd), Events: unix.POLLIN}, {Fd: int32(c.stopFD), Events: unix.POLLIN}}
	// Poll before reading: the caller has just found nothing, and poll
	// returns at once if a request came meanwhile (it reports the state,
	// not a change).
	for {
		if c.stopping.Load() {
			return 0, errStopped
		}
		if _, err := unix.Poll(fds, -1); err != nil && err != unix.EINTR {
			return 0, fmt.Errorf("poll /dev/fuse: %w", err)
		}
		if c.stopping.Load() {
			return 0, errStopped
		}
		n, err := unix.Read(c.fd, r.request())
		if err != unix.EAGAIN {
			return n, err
		}
	}
}

// serve answers the request of n bytes that r holds; false: the test
// hook made the reader drop it.
func (c *fuseConn) serve(r *reader, n int) bool {
	h, args, err := parseRequest(r.request()[:n])
	if testHookServe != nil && err == nil && testHookServe(h, args) {
		return false
	}
	var answer []byte
	errno := syscall.EIO
	if err != nil {
		c.logf("fuse: %v", err)
	} else {
		if h.Unique&uniqueResend != 0 {
			c.resent.Do(func() {
				c.logf("serving requests that the previous server had taken and not answered, resent by the kernel")
			})
		}
		answer, errno = c.fs.serve(h, args, r)
	}
	if errno != 0 {
		answer = r.out[:outHeaderSize]
	}
	if answer == nil || h.Unique == 0 {
		return true
	}
	putOutHeader(answer, len(answer), errno, h.Unique)
	// ENOENT: the kernel no longer waits for this answer (the request
	// was interrupted, or its connection aborted).
	if _, err := unix.Write(c.fd, answer); err != nil && err != unix.ENOENT && err != unix.ENODEV {
		c.logf("fuse: answer request %d (opcode %d): %v", h.Unique, h.Opcode, err)
	}
	return true
}

func (c *fuseConn) end(err error) {
	c.endMu.Lock()
	defer c.endMu.Unlock()
	if c.endErr == nil {
		c.endErr = err
	}
	// ENODEV is how a connection ends: its superblock is gone.
	if err != errStopped && err != unix.ENODEV && c.endErr == err {
		c.logf("fuse: reading /dev/fuse: %v; the device stops being served", err)
	}
}

// ended reports why the readers returned (nil while they run).
func (c *fuseConn) ended() error {
	select {
	case <-c.done:
	default:
		return nil
	}
	c.endMu.Lock()
	defer c.endMu.Unlock()
	return c.endErr
}

// stop makes the readers return once they have answered the requests
// they hold, and waits for them until ctx ends. Requests that arrive
// meanwhile wait in the kernel for the next server.
func (c *fuseConn) stop(ctx context.Context) error {
	c.stopping.Store(true)
	one := [8]byte{1}
	if _, err := unix.Write(c.stopFD, one[:]); err != nil {
		return fmt.Errorf("fuse: wake readers: %w", err)
	}
	select {
	case <-c.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("fuse: requests still in flight: %w", ctx.Err())
	}
}

// resend asks the kernel to queue again every request read from the
// /dev/fuse descriptor fd's connection and not answered: what a dead
// server had taken. Readers get them with uniqueResend set.
func resend(fd int) error {
	var msg [outHeaderSize]byte
	if _, err := unix.Write(fd, msg[:putNotify(msg[:], notifyResend)]); err != nil {
		return fmt.Errorf("fuse: notify resend: %w", err)
	}
	return nil
}

// close closes the descriptors once the readers have returned.
func (c *fuseConn) close() {
	<-c.done
	unix.Close(c.fd)
	unix.Close(c.stopFD)
}

// fuseAlive reports whether the connection of the /dev/fuse descriptor
// fd still lives: the kernel reports POLLERR once it is aborted.
func fuseAlive(fd int) bool {
	p := []unix.PollFd{{Fd: int32(fd)}}
	n, err := unix.Poll(p, 0)
	return err == nil && (n == 0 || p[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) == 0)
}
