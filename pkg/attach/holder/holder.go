// Package holder keeps FUSE connections alive while no server serves
// them, so that a new server can take them over.
//
// A FUSE connection lives as long as some process holds an open file
// description of its /dev/fuse. When the only holder is the server and
// the server dies (a crash, SIGKILL, an upgrade), the kernel aborts the
// connection and whatever sits on the FUSE file (a loop device, and a
// filesystem on that) gets I/O errors. A holder is a small process of
// its own that keeps a duplicate of the server's descriptor: the
// connection then outlives the server, its users' requests wait in the
// kernel, and the next server fetches the descriptor from the holder,
// serves what waited and asks the kernel to resend what the dead server
// had read but not answered (FUSE_NOTIFY_RESEND, Linux 6.9).
//
// A holder keeps descriptors by name. It listens on a Unix socket of
// type SOCK_SEQPACKET; every message is one JSON object, descriptors
// travel beside it as SCM_RIGHTS:
//
//	{"op":"put","name":N}  + descriptors  hold them as N (replacing what N held)
//	{"op":"get","name":N}                 answered with a duplicate of N's first
//	{"op":"drop","name":N}                close N's (nothing held as N is fine)
//	{"op":"list"}                         {"names":[...]}
//
// The first descriptor of a put is the /dev/fuse one; block devices may
// follow, kept open with it: a loop device on the connection's file,
// which would otherwise clear itself (autoclear) when the server that
// held it open dies while nobody else has it open.
//
// Every answer is {"ok":true,...} or {"error":"...","notHeld":bool}. A
// holder takes only /dev/fuse descriptors whose connection lives, and
// drops one, with what it keeps beside it, by itself once its connection
// ends (the kernel reports POLLERR on it once the FUSE superblock is
// gone); with ExitWhenEmpty it ends once it holds nothing. Killing a
// holder thus ends the connections only it kept, and lets their loop
// devices clear themselves once unused.
//
// Holders listen in one folder, at holder-NAME.sock. Servers put into
// their own holder and fetch by trying every socket in the folder, so a
// new holder (a new version) and an old one can hand over without
// talking to each other; a socket file that refuses connections is the
// leftover of a dead holder and is removed. A server that finds no
// holder starts one (Start: quorumctl attach's is holder-quorumctl.sock,
// and exits once it holds nothing); a Kubernetes node runs one as a
// container of its own beside the data path (quorumctl fuse-holder),
// sharing the folder. A holder must outlive the servers: stopping it
// while no server runs ends the connections it alone holds.
package holder

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNotHeld is wrapped when no holder has the name asked for.
var ErrNotHeld = errors.New("no holder has it")

// SocketPattern matches the sockets of the holders in a folder.
const SocketPattern = "holder-*.sock"

// Socket is the path of the holder called name in dir.
func Socket(dir, name string) string { return filepath.Join(dir, "holder-"+name+".sock") }

type request struct {
	Op   string `json:"op"`
	Name string `json:"name,omitempty"`
}

type response struct {
	OK      bool     `json:"ok,omitempty"`
	Error   string   `json:"error,omitempty"`
	NotHeld bool     `json:"notHeld,omitempty"`
	Names   []string `json:"names,omitempty"`
}

// maxMessage bounds a message; names are short.
const maxMessage = 64 << 10

// entry is what is held under a name: a FUSE connection's descriptor
// and those kept open with it.
type entry struct {
	fuse int
	with []int
}

func (e entry) fds() []int { return append([]int{e.fuse}, e.with...) }

// maxFDs bounds the descriptors of a put.
const maxFDs = 4

// Options configure a holder.
type Options struct {
	// ExitWhenEmpty ends Serve once the holder holds nothing: after the
	// last descriptor was dropped or its connection ended, or when
	// nothing was put within IdleTimeout of the start.
	ExitWhenEmpty bool
	// IdleTimeout: see ExitWhenEmpty; one minute if zero.
	IdleTimeout time.Duration
	// Logf reports what the holder drops by itself; nil discards.
	Logf func(format string, args ...any)
}

// Server is a holder.
type Server struct {
	l    *net.UnixListener
	path string
	ino  uint64 // of the socket file, so that only ours is removed
	opts Options
	wake int // eventfd: the held set changed

	mu       sync.Mutex
	held     map[string]entry
	toClose  []int // dropped, closed by the poller (which may be polling them)
	everHeld bool
	exiting  bool
	empty    chan struct{} // closed once ExitWhenEmpty ends the holder
}

// Listen makes a holder listening at path. A socket file left there by
// a dead holder is replaced; a live holder there is an error.
func Listen(path string, opts Options) (*Server, error) {
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = time.Minute
	}
	// A holder may start before whoever made its folder: the data path
	// container beside it makes the state folder too.
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("holder: socket folder: %w", err)
	}
	addr := &net.UnixAddr{Name: path, Net: "unixpacket"}
	l, err := net.ListenUnix("unixpacket", addr)
	if errors.Is(err, syscall.EADDRINUSE) {
		if removeIfDead(path) {
			l, err = net.ListenUnix("unixpacket", addr)
		} else {
			return nil, fmt.Errorf("holder: another holder listens at %s", path)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("holder: %w", err)
	}
	l.SetUnlinkOnClose(false)
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		l.Close()
		return nil, fmt.Errorf("holder: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("holder: eventfd: %w", err)
	}
	return &Server{l: l, path: path, ino: st.Ino, opts: opts, wake: wake, held: map[string]entry{}, empty: make(chan struct{})}, nil
}

// Serve answers requests until ctx ends or, with ExitWhenEmpty, the
// holder holds nothing; then it closes every descriptor it holds and
// removes its socket.
func (s *Server) Serve(ctx context.Context) error {
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		s.poll()
	}()
	go s.accept()
	if s.opts.ExitWhenEmpty {
		idle := time.AfterFunc(s.opts.IdleTimeout, func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			if !s.everHeld {
				s.exitIfEmpty(true)
			}
		})
		defer idle.Stop()
	}
	select {
	case <-ctx.Done():
	case <-s.empty:
	}
	s.mu.Lock()
	s.exiting = true
	s.mu.Unlock()
	s.l.Close()
	var st unix.Stat_t
	if unix.Stat(s.path, &st) == nil && st.Ino == s.ino {
		os.Remove(s.path)
	}
	s.signal()
	<-polled
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, e := range s.held {
		for _, fd := range e.fds() {
			unix.Close(fd)
		}
		delete(s.held, name)
	}
	unix.Close(s.wake)
	return nil
}

func (s *Server) accept() {
	for {
		c, err := s.l.AcceptUnix()
		if err != nil {
			return
		}
		go s.serveConn(c)
	}
}

func (s *Server) serveConn(c *net.UnixConn) {
	defer c.Close()
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4*maxFDs))
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil || n == 0 {
			return
		}
		fds := receivedFDs(oob[:oobn])
		var req request
		var resp response
		fd := -1
		if err := json.Unmarshal(buf[:n], &req); err != nil {
			resp.Error = fmt.Sprintf("bad request: %v", err)
		} else {
			resp, fd = s.do(req, fds)
		}
		for _, f := range fds {
			if f >= 0 {
				unix.Close(f)
			}
		}
		b, _ := json.Marshal(resp)
		var rights []byte
		if fd >= 0 {
			rights = unix.UnixRights(fd)
		}
		_, _, err = c.WriteMsgUnix(b, rights, nil)
		if fd >= 0 {
			unix.Close(fd)
		}
		if err != nil {
			return
		}
	}
}

// do runs one request. A descriptor it keeps it takes out of fds (sets
// to -1); the one it returns is the caller's to send and close.
func (s *Server) do(req request, fds []int) (response, int) {
	switch req.Op {
	case "put":
		if req.Name == "" || len(fds) == 0 {
			return response{Error: "put wants a name and a descriptor"}, -1
		}
		if err := checkFUSE(fds[0]); err != nil {
			return response{Error: err.Error()}, -1
		}
		for _, fd := range fds[1:] {
			if err := checkBlock(fd); err != nil {
				return response{Error: err.Error()}, -1
			}
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.exiting {
			return response{Error: "the holder is exiting"}, -1
		}
		if old, ok := s.held[req.Name]; ok {
			s.toClose = append(s.toClose, old.fds()...)
		}
		e := entry{fuse: fds[0], with: slices.Clone(fds[1:])}
		for i := range fds {
			fds[i] = -1
		}
		s.held[req.Name] = e
		s.everHeld = true
		s.signal()
		return response{OK: true}, -1
	case "get":
		s.mu.Lock()
		defer s.mu.Unlock()
		e, ok := s.held[req.Name]
		if !ok {
			return response{Error: fmt.Sprintf("%q is not held here", req.Name), NotHeld: true}, -1
		}
		dup, err := unix.FcntlInt(uintptr(e.fuse), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return response{Error: fmt.Sprintf("duplicate %q: %v", req.Name, err)}, -1
		}
		return response{OK: true}, dup
	case "drop":
		s.mu.Lock()
		defer s.mu.Unlock()
		s.dropLocked(req.Name)
		return response{OK: true}, -1
	case "list":
		s.mu.Lock()
		defer s.mu.Unlock()
		names := make([]string, 0, len(s.held))
		for n := range s.held {
			names = append(names, n)
		}
		sort.Strings(names)
		return response{OK: true, Names: names}, -1
	}
	return response{Error: fmt.Sprintf("unknown op %q", req.Op)}, -1
}

func (s *Server) dropLocked(name string) {
	e, ok := s.held[name]
	if !ok {
		return
	}
	delete(s.held, name)
	s.toClose = append(s.toClose, e.fds()...)
	s.signal()
	s.exitIfEmpty(false)
}

// exitIfEmpty ends an ExitWhenEmpty holder that holds nothing; idle
// says whether it never held anything. Called with mu held.
func (s *Server) exitIfEmpty(idle bool) {
	if !s.opts.ExitWhenEmpty || s.exiting || len(s.held) > 0 || (!idle && !s.everHeld) {
		return
	}
	// From here on puts are refused, so nothing is put into a holder
	// that is about to close it.
	s.exiting = true
	close(s.empty)
}

// signal wakes the poller.
func (s *Server) signal() {
	one := [8]byte{1}
	unix.Write(s.wake, one[:])
}

// poll watches every held descriptor and drops those whose connection
// ended. Closing happens only here, between polls, so that no
// descriptor number is reused while poll still watches it.
func (s *Server) poll() {
	var buf [8]byte
	for {
		s.mu.Lock()
		for _, fd := range s.toClose {
			unix.Close(fd)
		}
		s.toClose = s.toClose[:0]
		if s.exiting {
			s.mu.Unlock()
			return
		}
		names := make([]string, 0, len(s.held))
		fds := []unix.PollFd{{Fd: int32(s.wake), Events: unix.POLLIN}}
		for name, e := range s.held {
			names = append(names, name)
			fds = append(fds, unix.PollFd{Fd: int32(e.fuse)})
		}
		s.mu.Unlock()
		if _, err := unix.Poll(fds, -1); err != nil && err != unix.EINTR {
			s.opts.Logf("holder: poll: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		unix.Read(s.wake, buf[:])
		s.mu.Lock()
		for i, p := range fds[1:] {
			if p.Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 && s.held[names[i]].fuse == int(p.Fd) {
				s.opts.Logf("holder: dropped %s: its FUSE connection ended", names[i])
				s.dropLocked(names[i])
			}
		}
		s.mu.Unlock()
	}
}

// checkFUSE accepts a /dev/fuse descriptor whose connection lives.
func checkFUSE(fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat the descriptor: %v", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 10 || unix.Minor(st.Rdev) != 229 {
		return errors.New("the descriptor is not /dev/fuse")
	}
	p := []unix.PollFd{{Fd: int32(fd)}}
	if n, err := unix.Poll(p, 0); err != nil || n > 0 && p[0].Revents != 0 {
		return errors.New("the descriptor's FUSE connection has ended (or was never mounted)")
	}
	return nil
}

// checkBlock accepts a block device, kept open beside a connection.
func checkBlock(fd int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat the descriptor: %v", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return errors.New("a descriptor kept with a connection is not a block device")
	}
	return nil
}

func receivedFDs(oob []byte) []int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for _, m := range msgs {
		if rights, err := unix.ParseUnixRights(&m); err == nil {
			fds = append(fds, rights...)
		}
	}
	return fds
}

// call sends one request, with fds, to the holder at sock and returns
// its answer and the descriptor that came with it (-1 if none).
func call(sock string, req request, fds ...int) (response, int, error) {
	c, err := net.DialTimeout("unixpacket", sock, 5*time.Second)
	if err != nil {
		return response{}, -1, err
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	uc.SetDeadline(time.Now().Add(10 * time.Second))
	b, _ := json.Marshal(req)
	var rights []byte
	if len(fds) > 0 {
		rights = unix.UnixRights(fds...)
	}
	if _, _, err := uc.WriteMsgUnix(b, rights, nil); err != nil {
		return response{}, -1, err
	}
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4*maxFDs))
	n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
	if err != nil {
		return response{}, -1, err
	}
	received := receivedFDs(oob[:oobn])
	got := -1
	if len(received) > 0 {
		got = received[0]
		for _, f := range received[1:] {
			unix.Close(f)
		}
	}
	var resp response
	if err := json.Unmarshal(buf[:n], &resp); err != nil {
		if got >= 0 {
			unix.Close(got)
		}
		return response{}, -1, fmt.Errorf("answer %q: %w", buf[:n], err)
	}
	if !resp.OK {
		if got >= 0 {
			unix.Close(got)
		}
		err := errors.New(resp.Error)
		if resp.NotHeld {
			err = fmt.Errorf("%w: %s", ErrNotHeld, resp.Error)
		}
		return resp, -1, err
	}
	return resp, got, nil
}

// Put hands fuse, a /dev/fuse descriptor, and with it the block devices
// with, to the holder at sock as name; they stay the caller's too.
func Put(sock, name string, fuse int, with ...int) error {
	if _, _, err := call(sock, request{Op: "put", Name: name}, append([]int{fuse}, with...)...); err != nil {
		return fmt.Errorf("holder %s: put %s: %w", sock, name, err)
	}
	return nil
}

// Get fetches a duplicate of what is held as name from the first holder
// in dir that has it, and the socket of that holder. It wraps
// ErrNotHeld only when every holder there answered that it has not.
func Get(dir, name string) (fd int, sock string, err error) {
	var errs []error
	for _, sock := range Sockets(dir) {
		_, fd, err := call(sock, request{Op: "get", Name: name})
		if err == nil {
			if fd < 0 {
				return -1, "", fmt.Errorf("holder %s: get %s: answer without a descriptor", sock, name)
			}
			return fd, sock, nil
		}
		if !errors.Is(err, ErrNotHeld) {
			errs = append(errs, fmt.Errorf("holder %s: %w", sock, err))
		}
	}
	if len(errs) > 0 {
		// One that did not answer may have it.
		return -1, "", fmt.Errorf("get %s from the holders in %s: %w", name, dir, errors.Join(errs...))
	}
	return -1, "", fmt.Errorf("get %s from the holders in %s: %w", name, dir, ErrNotHeld)
}

// Drop makes every holder in dir close what it holds as name. A holder
// that goes away meanwhile (one that exits once empty, as its last
// connection ended) holds nothing any more, which is no error.
func Drop(dir, name string) error {
	var errs []error
	for _, sock := range Sockets(dir) {
		_, _, err := call(sock, request{Op: "drop", Name: name})
		if err != nil && !gone(err) {
			errs = append(errs, fmt.Errorf("holder %s: drop %s: %w", sock, name, err))
		}
	}
	return errors.Join(errs...)
}

// gone reports whether err says the holder closed or refused the
// connection.
func gone(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ENOENT)
}

// List returns the names the holder at sock holds.
func List(sock string) ([]string, error) {
	resp, _, err := call(sock, request{Op: "list"})
	if err != nil {
		return nil, fmt.Errorf("holder %s: list: %w", sock, err)
	}
	return resp.Names, nil
}

// Live reports whether a holder answers at sock.
func Live(sock string) bool {
	_, err := List(sock)
	return err == nil
}

// Sockets returns the sockets of the holders in dir that accept
// connections, removing those of dead holders.
func Sockets(dir string) []string {
	paths, _ := filepath.Glob(filepath.Join(dir, SocketPattern))
	return slices.DeleteFunc(paths, removeIfDead)
}

// removeIfDead removes the socket file at path if nothing listens there
// any more (it refuses connections), and reports whether it was dead.
func removeIfDead(path string) bool {
	var before unix.Stat_t
	if unix.Stat(path, &before) != nil {
		return true
	}
	c, err := net.DialTimeout("unixpacket", path, 5*time.Second)
	if err == nil {
		c.Close()
		return false
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return !errors.Is(err, syscall.EAGAIN) && !errors.Is(err, os.ErrDeadlineExceeded)
	}
	// A holder that just replaced the dead one has a new file there.
	var after unix.Stat_t
	if unix.Stat(path, &after) == nil && after.Ino == before.Ino {
		os.Remove(path)
	}
	return true
}

// startEnv, in a process's environment, makes this package's init serve
// as a holder at the socket it names and exit, instead of running the
// program: Start starts a holder from any program that links this
// package (quorumctl, the data path, a test binary) by running it again.
const startEnv = "QUORUM_FUSE_HOLDER_SOCKET"

func init() {
	sock := os.Getenv(startEnv)
	if sock == "" {
		return
	}
	os.Unsetenv(startEnv)
	s, err := Listen(sock, Options{ExitWhenEmpty: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	s.Serve(ctx)
	stop()
	os.Exit(0)
}

// Start starts a holder of its own at sock, which exits once it holds
// nothing: this program again (see startEnv; its arguments say what it
// is, as quorumctl fuse-holder would take them), in a session of its
// own with stdio on /dev/null, so that signals to the caller's process
// group or terminal do not reach it and it does not keep the caller's
// output open, and in / so that it does not keep the caller's working
// folder busy. It returns once a holder answers at sock (another one
// that won a race counts).
func Start(sock string) error {
	sock, err := filepath.Abs(sock)
	if err != nil {
		return fmt.Errorf("holder: %w", err)
	}
	cmd := exec.Command("/proc/self/exe", "fuse-holder", "--exit-when-empty", "--socket", sock)
	cmd.Env = append(os.Environ(), startEnv+"="+sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("holder: start one at %s: %w", sock, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(10 * time.Second)
	for !Live(sock) {
		select {
		case err := <-exited:
			if Live(sock) {
				return nil
			}
			return fmt.Errorf("holder: the one started at %s exited: %v", sock, err)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("holder: the one started at %s does not answer after 10s", sock)
		}
	}
	return nil
}
