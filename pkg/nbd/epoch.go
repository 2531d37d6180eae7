package nbd

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/quorum-csi/quorum-csi/internal/atomicfile"
)

// epochSep separates an export's name from the epoch a client presents
// for it; see the package documentation.
const epochSep = "@epoch="

// ExportName is the name a client sends to open export name with epoch
// (no suffix for epoch 0, a plain client).
func ExportName(name string, epoch uint64) string {
	if epoch == 0 {
		return name
	}
	return name + epochSep + strconv.FormatUint(epoch, 10)
}

// SplitExportName splits a wire export name into the export and the
// epoch presented (0: none). Only a final "@epoch=N" with N a decimal
// number from 1 is an epoch; a name that ends in "@epoch=" followed by
// anything else is refused, so that a typo never silently becomes an
// epoch-less (plain) connection.
func SplitExportName(s string) (name string, epoch uint64, err error) {
	i := strings.LastIndex(s, epochSep)
	if i < 0 {
		return s, 0, nil
	}
	digits := s[i+len(epochSep):]
	e, err := strconv.ParseUint(digits, 10, 64)
	if err != nil || e == 0 || digits[0] == '+' || (len(digits) > 1 && digits[0] == '0') {
		return "", 0, fmt.Errorf("export name %q: epoch %q is not a decimal number from 1", s, digits)
	}
	return s[:i], e, nil
}

// EpochStore keeps the highest epoch a server has accepted for one
// export, so that a restarted server still refuses the holders it had
// fenced. The server loads it once, when the export is added, and calls
// Store before it acts on a newer epoch: if Store fails, the request that
// presented the epoch fails and nothing is fenced.
type EpochStore interface {
	LoadEpoch() (uint64, error)
	StoreEpoch(epoch uint64) error
}

// MemEpochs is an EpochStore in memory, for tests and for exports whose
// fencing need not survive a restart.
type MemEpochs struct {
	mu    sync.Mutex
	epoch uint64
}

func (m *MemEpochs) LoadEpoch() (uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.epoch, nil
}

func (m *MemEpochs) StoreEpoch(e uint64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.epoch = e
	return nil
}

// EpochFile is an EpochStore in a small file holding the epoch in
// decimal. A missing file is epoch 0. It is replaced atomically
// (temporary file, fsync, rename, fsync of the folder), so a crash leaves
// the old or the new epoch, never a torn one.
type EpochFile string

func (f EpochFile) LoadEpoch() (uint64, error) {
	b, err := os.ReadFile(string(f))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("load epoch: %w", err)
	}
	e, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("load epoch from %s: %w", f, err)
	}
	return e, nil
}

func (f EpochFile) StoreEpoch(e uint64) error {
	if err := atomicfile.WriteFile(string(f), []byte(strconv.FormatUint(e, 10)+"\n"), 0o600); err != nil {
		return fmt.Errorf("store epoch %d: %w", e, err)
	}
	return nil
}

// The server's fence: a connection presents an epoch when it opens an
// export (resolve, attach); its first write or flush under a newer epoch
// makes that epoch current and persists it (beginWrite, activate), which
// ends every connection holding an older one; check refuses requests of
// a fenced connection.

func fencedMessage(epoch uint64, x *export) string {
	return fmt.Sprintf("%s epoch %d of export %q is older than its current epoch %d", fencedPrefix, epoch, x.Name, x.epoch.Load())
}

// attach enters the connection into its export's list, unless a newer
// epoch took over since resolve; the check and the entry are atomic with
// respect to activate, which ends every older connection in the list.
func (c *serverConn) attach(x *export, epoch uint64, readOnly bool) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.Epochs != nil && epoch != 0 && epoch < x.epoch.Load() {
		return false
	}
	c.exp, c.epoch, c.readOnly = x, epoch, readOnly
	c.flags = transmissionFlags(c.structured, readOnly)
	x.conns[c] = struct{}{}
	return true
}

// beginWrite admits a write-class request under the export's fence; the
// caller calls release once the backend is done with it. A connection
// presenting a newer epoch than the current one activates it here, on
// its first write or flush.
func (c *serverConn) beginWrite() (release func(), errno Errno, msg string) {
	x := c.exp
	if x.Epochs == nil {
		return func() {}, 0, ""
	}
	for {
		x.fence.RLock()
		cur := x.epoch.Load()
		if c.fenced.Load() || c.epoch < cur {
			x.fence.RUnlock()
			return nil, EPERM, fencedMessage(c.epoch, x)
		}
		if c.epoch == cur {
			return x.fence.RUnlock, 0, ""
		}
		x.fence.RUnlock()
		if err := c.srv.activate(x, c.epoch); err != nil {
			return nil, EIO, err.Error()
		}
	}
}

// activate makes epoch current on x: it waits for the writes in flight
// under older epochs, persists the epoch, and ends the connections that
// hold older ones.
func (s *Server) activate(x *export, epoch uint64) error {
	x.fence.Lock()
	var old []*serverConn
	if prev := x.epoch.Load(); epoch > prev {
		if err := x.Epochs.StoreEpoch(epoch); err != nil {
			x.fence.Unlock()
			return fmt.Errorf("export %q: persist epoch %d: %w", x.Name, epoch, err)
		}
		x.epoch.Store(epoch)
		x.mu.Lock()
		for c := range x.conns {
			if c.epoch != 0 && c.epoch < epoch {
				c.fenced.Store(true)
				old = append(old, c)
			}
		}
		x.mu.Unlock()
		s.log.Info("nbd: new epoch is current; older holders are fenced", "export", x.Name, "epoch", epoch, "previous", prev, "ended", len(old))
	}
	x.fence.Unlock()
	for _, c := range old {
		// Gracefully: requests it already read are answered (writes
		// among them with EPERM), then it closes.
		c.stop()
	}
	return nil
}
