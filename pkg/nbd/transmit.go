package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"time"
)

// transmit reads requests until the client disconnects or the
// connection ends, serving each in its own goroutine.
func (c *serverConn) transmit(ctx context.Context) error {
	c.raw.SetDeadline(time.Time{})
	c.mu.Lock()
	c.transmitting = true
	stopping := c.stopping.Load()
	c.mu.Unlock()
	if stopping {
		return nil
	}
	c.log = c.log.With("export", c.exp.Name, "epoch", c.epoch)
	c.fw = newFrameWriter(c.nc)
	b := newBudget(c.srv.cfg.MaxInFlight, c.srv.cfg.MaxInFlightBytes)
	defer func() {
		b.close()
		c.handlers.Wait()
		c.wmu.Lock()
		c.fw.flush()
		c.wmu.Unlock()
	}()
	for {
		q, err := ReadRequest(c.br)
		if err != nil {
			var ne net.Error
			if c.stopping.Load() && errors.As(err, &ne) && ne.Timeout() {
				return nil // Shutdown: serve what we have, read no more
			}
			if errors.Is(err, io.EOF) {
				return nil // client left without NBD_CMD_DISC
			}
			return fmt.Errorf("read request: %w", err)
		}
		var payload []byte
		switch q.Command {
		case CmdDisc:
			return nil
		case CmdWrite:
			if q.Length > MaxPayload {
				// Its payload is too large to skip safely: the protocol
				// lets the server drop such a client.
				return protoErrorf("write of %d bytes at %d, limit %d", q.Length, q.Offset, MaxPayload)
			}
			if errno, msg := c.check(q); errno != 0 {
				// Refused anyway: skip the payload instead of buffering it.
				if _, err := io.CopyN(io.Discard, c.br, int64(q.Length)); err != nil {
					return fmt.Errorf("read write payload: %w", unexpected(err))
				}
				c.sendError(q, errno, msg)
				continue
			}
			payload = getBuf(int(q.Length))
			if _, err := io.ReadFull(c.br, payload); err != nil {
				putBuf(payload)
				return fmt.Errorf("read write payload: %w", unexpected(err))
			}
		}
		weight := int64(0)
		if q.Command == CmdRead || q.Command == CmdWrite {
			weight = int64(min(q.Length, MaxPayload))
		}
		if !b.acquire(weight) {
			putBuf(payload)
			return nil
		}
		c.handlers.Add(1)
		go func() {
			defer c.handlers.Done()
			defer b.release(weight)
			c.serve(ctx, q, payload)
			putBuf(payload)
		}()
	}
}

// writeClass reports whether cmd changes data or durability; these are
// what fencing and read-only exports refuse.
func writeClass(cmd Command) bool {
	switch cmd {
	case CmdWrite, CmdWriteZeroes, CmdTrim, CmdFlush:
		return true
	}
	return false
}

// check validates a request against the protocol and the export. It
// returns 0 for a request to execute.
func (c *serverConn) check(q Request) (Errno, string) {
	allowed := CmdFlagFUA
	switch q.Command {
	case CmdRead:
		if c.structured {
			allowed |= CmdFlagDF
		}
	case CmdWriteZeroes:
		allowed |= CmdFlagNoHole
	case CmdBlockStatus:
		allowed |= CmdFlagReqOne
	case CmdWrite, CmdFlush, CmdTrim, CmdCache:
	default:
		return EINVAL, fmt.Sprintf("unknown command %v", q.Command)
	}
	if bad := q.Flags &^ allowed; bad != 0 {
		return EINVAL, fmt.Sprintf("flags %v not valid for %v", bad, q.Command)
	}
	if c.fenced.Load() || (c.exp.Epochs != nil && c.epoch != 0 && c.epoch < c.exp.epoch.Load()) {
		return EPERM, fencedMessage(c.epoch, c.exp)
	}
	if writeClass(q.Command) && c.readOnly && q.Command != CmdFlush {
		return EPERM, fmt.Sprintf("export %q is read-only on this connection", c.exp.Name)
	}
	if q.Command == CmdFlush {
		return 0, ""
	}
	end, carry := bits.Add64(q.Offset, uint64(q.Length), 0)
	if carry != 0 || end > uint64(c.exp.size) {
		if q.Command == CmdWrite || q.Command == CmdWriteZeroes {
			return ENOSPC, fmt.Sprintf("%v at %d length %d beyond the export's %d bytes", q.Command, q.Offset, q.Length, c.exp.size)
		}
		return EINVAL, fmt.Sprintf("%v at %d length %d beyond the export's %d bytes", q.Command, q.Offset, q.Length, c.exp.size)
	}
	if m := uint64(c.exp.minBlock); q.Offset%m != 0 || uint64(q.Length)%m != 0 {
		return EINVAL, fmt.Sprintf("%v at %d length %d not aligned to the block size %d", q.Command, q.Offset, q.Length, m)
	}
	switch q.Command {
	case CmdRead:
		if q.Length > MaxPayload {
			return EINVAL, fmt.Sprintf("read of %d bytes, limit %d", q.Length, MaxPayload)
		}
	case CmdBlockStatus:
		if !c.metaAlloc {
			return EINVAL, "no metadata context was negotiated"
		}
		if q.Length == 0 {
			return EINVAL, "block status of length 0"
		}
	}
	return 0, ""
}

// serve executes one request and sends its reply.
func (c *serverConn) serve(ctx context.Context, q Request, payload []byte) {
	if errno, msg := c.check(q); errno != 0 {
		c.sendError(q, errno, msg)
		return
	}
	bk := c.exp.Backend
	off, n := int64(q.Offset), int64(q.Length)
	var err error
	switch q.Command {
	case CmdRead:
		buf := getBuf(int(n))
		defer putBuf(buf)
		if n > 0 {
			err = bk.ReadAt(ctx, buf, off)
		}
		if err == nil {
			c.sendData(q, buf)
			return
		}
	case CmdCache:
		// Advisory; the page cache is not ours to fill.
	case CmdBlockStatus:
		var ext []Extent
		if ext, err = c.extents(ctx, q); err == nil {
			c.sendBlockStatus(q, ext)
			return
		}
	case CmdFlush:
		if c.readOnly {
			// A read-only connection wrote nothing, so there is nothing
			// to fence; its flush still reaches the disk (CAN_MULTI_CONN).
			err = bk.Flush(ctx)
			break
		}
		err = c.write(ctx, q, payload)
	default:
		err = c.write(ctx, q, payload)
	}
	if err != nil {
		c.log.Debug("nbd: request failed", "command", q.Command, "offset", q.Offset, "length", q.Length, "error", err)
		msg := err.Error()
		var re *RequestError
		if errors.As(err, &re) {
			msg = re.Message // our own refusal, worded for the client
		}
		c.sendError(q, errnoOf(err), msg)
		return
	}
	c.sendOK(q)
}

// write runs a write-class request (WRITE, WRITE_ZEROES, TRIM, FLUSH)
// under the export's fence.
func (c *serverConn) write(ctx context.Context, q Request, payload []byte) error {
	release, errno, msg := c.beginWrite()
	if errno != 0 {
		return &RequestError{Errno: errno, Message: msg}
	}
	defer release()
	bk := c.exp.Backend
	off, n := int64(q.Offset), int64(q.Length)
	var err error
	switch {
	case q.Command == CmdFlush:
		return bk.Flush(ctx)
	case n == 0:
		return nil
	case q.Command == CmdWrite:
		err = bk.WriteAt(ctx, payload, off)
	case q.Command == CmdWriteZeroes && q.Flags&CmdFlagNoHole != 0:
		err = bk.WriteZeroes(ctx, off, n)
	default:
		// TRIM, and WRITE_ZEROES that may punch holes: Discard leaves
		// zeroes, which both allow.
		err = bk.Discard(ctx, off, n)
	}
	if err == nil && q.Flags&CmdFlagFUA != 0 {
		err = bk.Flush(ctx)
	}
	return err
}

func (c *serverConn) extents(ctx context.Context, q Request) ([]Extent, error) {
	el, ok := c.exp.Backend.(ExtentLister)
	if !ok {
		return []Extent{{Length: q.Length}}, nil
	}
	ext, err := el.Extents(ctx, int64(q.Offset), int64(q.Length))
	if err != nil {
		return nil, err
	}
	if len(ext) == 0 {
		return nil, fmt.Errorf("backend reported no extents at %d", q.Offset)
	}
	var sum uint64
	for i, e := range ext {
		sum += uint64(e.Length)
		if e.Length == 0 || e.Length%c.exp.minBlock != 0 || sum > uint64(q.Length) {
			return nil, fmt.Errorf("backend reported an invalid extent %+v at %d", e, q.Offset)
		}
		if q.Flags&CmdFlagReqOne != 0 && i == 0 {
			return ext[:1], nil
		}
	}
	return ext, nil
}

// Replies. Each is written whole under wmu; the last writer to leave
// flushes, so replies completing together share a system call.
