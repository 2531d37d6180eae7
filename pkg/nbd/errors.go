package nbd

import (
	"errors"
	"fmt"
	"syscall"
)

// Errno is an NBD error value, as carried by replies. The protocol
// restricts them to a few errno values; anything else a peer sends is
// treated as EINVAL, as the protocol asks.
type Errno uint32

const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

// errnoText holds the values the protocol defines, with their meaning.
var errnoText = map[Errno]string{
	EPERM:     "NBD_EPERM: operation not permitted",
	EIO:       "NBD_EIO: input/output error",
	ENOMEM:    "NBD_ENOMEM: cannot allocate memory",
	EINVAL:    "NBD_EINVAL: invalid argument",
	ENOSPC:    "NBD_ENOSPC: no space left on device",
	EOVERFLOW: "NBD_EOVERFLOW: value too large",
	ENOTSUP:   "NBD_ENOTSUP: operation not supported",
	ESHUTDOWN: "NBD_ESHUTDOWN: server is shutting down",
}

func (e Errno) Error() string {
	if s, ok := errnoText[e]; ok {
		return s
	}
	return fmt.Sprintf("NBD error %d", uint32(e))
}

// Is lets errors.Is(err, syscall.EIO) and the like match an Errno, so
// that callers above the transport need not know NBD's numbering.
func (e Errno) Is(target error) bool {
	t, ok := target.(syscall.Errno)
	return ok && uint32(t) == uint32(e)
}

// known reports whether e is one of the values the protocol defines.
func (e Errno) known() bool {
	_, ok := errnoText[e]
	return ok
}

// errnoOf maps a backend error to the NBD error value to report. The
// protocol asks for EDQUOT and EFBIG as ENOSPC.
func errnoOf(err error) Errno {
	var ne Errno
	if errors.As(err, &ne) && ne.known() {
		return ne
	}
	var se syscall.Errno
	if errors.As(err, &se) {
		switch se {
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return EPERM
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return ENOSPC
		case syscall.EINVAL:
			return EINVAL
		case syscall.ENOMEM:
			return ENOMEM
		case syscall.EOVERFLOW:
			return EOVERFLOW
		case syscall.ENOTSUP:
			return ENOTSUP
		case syscall.ESHUTDOWN:
			return ESHUTDOWN
		}
	}
	return EIO
}

// RequestError is a failed transmission request as the server reported
// it: the error value, and the message of a structured error chunk if
// there was one. It matches its Errno with errors.Is.
type RequestError struct {
	Errno   Errno
	Message string
}

func (e *RequestError) Error() string {
	if e.Message == "" {
		return "server replied " + e.Errno.Error()
	}
	return fmt.Sprintf("server replied %v: %s", e.Errno, e.Message)
}

func (e *RequestError) Unwrap() error { return e.Errno }

// OptionError is a handshake option the server refused.
type OptionError struct {
	Option  Option
	Reply   ReplyType
	Message string
}

func (e *OptionError) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("server refused %v with %v", e.Option, e.Reply)
	}
	return fmt.Sprintf("server refused %v with %v: %s", e.Option, e.Reply, e.Message)
}

// ProtocolError is a violation of the protocol by the peer: malformed or
// unexpected bytes. The connection cannot continue after one.
type ProtocolError struct {
	Msg string
}

func (e *ProtocolError) Error() string { return "NBD protocol violation: " + e.Msg }

func protoErrorf(format string, args ...any) error {
	return &ProtocolError{Msg: fmt.Sprintf(format, args...)}
}

var (
	// ErrFenced is wrapped by every error of a client whose epoch a
	// newer holder of the export has overtaken. It is final: the client
	// does not reconnect, because its epoch can never become current
	// again (see the package documentation).
	ErrFenced = errors.New("fenced: a newer epoch holds the export")
	// ErrDisconnected is wrapped by requests that a client fails because
	// it has no connection: those whose deadline or context ended while
	// the client reconnected (with context.DeadlineExceeded or the
	// context's error), and those in flight on a connection that a
	// protocol violation ended. A connection loss alone fails nothing:
	// the requests are sent again on the next connection.
	ErrDisconnected = errors.New("not connected")
	// ErrExportChanged is wrapped by requests that a client fails because
	// the export it reconnected to is not the one it had: another size,
	// block size or read-only flag. The client keeps trying to reconnect.
	ErrExportChanged = errors.New("export changed across reconnect")
	// ErrClosed is wrapped by requests made after Client.Close.
	ErrClosed = errors.New("client closed")
	// ErrServerClosed is returned by Server.Serve after Shutdown or Close.
	ErrServerClosed = errors.New("nbd: server closed")
)

// fencedPrefix starts every message by which our server refuses a
// fenced client, in option replies and error chunks alike; the client
// recognises ErrFenced by it. Part of the fencing contract in doc.go.
const fencedPrefix = "fenced:"
