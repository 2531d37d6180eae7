package volume

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"syscall"
	"time"

	"github.com/quorum-csi/quorum-csi/pkg/nbd"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

// A replica on another machine is served over NBD as two exports of its
// replica server, both fenced by the replica's epoch file:
//
//   - NAME: the image, byte for byte; any NBD client can read it.
//   - NAME/meta: the sidecar, a small device that carries what lives
//     beside a local image, so that a remote replica takes part in the
//     identity checks, generations and journal exactly as a local one:
//
//     [0, 4096)                 the metadata (PATH.qmeta), JSON padded with
//     zero bytes. A write must cover exactly this block and may change
//     only the generation and the state; the server replaces the file
//     atomically before it answers.
//     [4096, 4096+journalArea)  the journal file (PATH.qjournal), byte for
//     byte; FLUSH makes its writes durable.
//
// An attach reads a remote replica's metadata and journal at open with
// its epoch presented but not active, which the replica server allows a
// newer epoch (a standby, see package nbd), and decides on none of it:
// it takes every replica over first (takeOver: it flushes the image
// export, then the sidecar; FLUSH is a write-class request, so it
// activates the attach's epoch on each), and only then reads both again.
// From then on the previous holder can neither write data nor commit a
// journal record to this replica, and the journal read holds the last
// record it committed there. A replica that does not answer a read then
// is left out, when the others hold every acknowledged write, and
// resynced in full once back (Volume.activate). A standby attach defers
// the takeover to its first write-class request.

// SidecarSuffix is appended to a replica's export name to name its
// sidecar export.
const SidecarSuffix = "/meta"

// metaBlock is the sidecar's metadata block.
const metaBlock = 4096

// Sidecar is the server side of a replica's sidecar export (an
// nbd.Backend over the replica's metadata and journal files).
type Sidecar struct {
	r    *replica.File
	size int64
}

// NewSidecar serves r's metadata and journal, with a journal area for
// the default geometry.
func NewSidecar(r *replica.File) *Sidecar {
	return &Sidecar{r: r, size: metaBlock + 2*slotSize(r.Size(), quorum.DefaultRegionSize, quorum.DefaultActiveExtents)}
}

// ReplicaExports are the two exports of replica r under name: the image
// (with its allocation map) and the sidecar. Close the closer after the
// server stopped using them.
func ReplicaExports(r *replica.File, name string, allowPlainRead bool) ([]nbd.Export, func() error, error) {
	img, err := nbd.WithFileExtents(r, r.Path())
	if err != nil {
		return nil, nil, err
	}
	epochs := nbd.EpochFile(replica.EpochPath(r.Path()))
	return []nbd.Export{
		{Name: name, Description: "replica " + r.Meta().ReplicaID + " of volume " + r.Meta().VolumeID, Backend: img, Epochs: epochs, AllowPlainRead: allowPlainRead},
		{Name: name + SidecarSuffix, Description: "metadata and journal of " + name, Backend: NewSidecar(r), Epochs: epochs, AllowPlainRead: allowPlainRead},
	}, img.Close, nil
}

func (s *Sidecar) Size() int64 { return s.size }

func (s *Sidecar) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off < metaBlock {
		n := min(int64(len(p)), metaBlock-off)
		block := make([]byte, metaBlock)
		copy(block, s.r.Meta().Marshal())
		copy(p, block[off:off+n])
		p, off = p[n:], metaBlock
	}
	if len(p) == 0 {
		return nil
	}
	return s.r.JournalAt(p, off-metaBlock)
}

func (s *Sidecar) WriteAt(ctx context.Context, p []byte, off int64) error {
	if off >= metaBlock {
		return s.r.WriteJournalAt(p, off-metaBlock)
	}
	if off != 0 || len(p) != metaBlock {
		return fmt.Errorf("replica %s: metadata writes must cover bytes 0 to %d: %w", s.r.Path(), metaBlock, syscall.EINVAL)
	}
	m, err := replica.ParseMeta(bytes.TrimRight(p, "\x00"), s.r.Path())
	if err != nil {
		return fmt.Errorf("%w: %w", err, syscall.EINVAL)
	}
	if !s.r.Meta().SameReplica(m) {
		return fmt.Errorf("replica %s: a metadata write may change only generation and state: %w", s.r.Path(), syscall.EPERM)
	}
	return s.r.UpdateMeta(func(cur *replica.Meta) { cur.Generation, cur.State = m.Generation, m.State })
}

// Flush makes journal writes durable; metadata writes are durable when
// they are answered.
func (s *Sidecar) Flush(ctx context.Context) error { return s.r.SyncJournal() }

func (s *Sidecar) Discard(ctx context.Context, off, length int64) error {
	return fmt.Errorf("replica %s: sidecar: discard: %w", s.r.Path(), syscall.ENOTSUP)
}

func (s *Sidecar) WriteZeroes(ctx context.Context, off, length int64) error {
	return fmt.Errorf("replica %s: sidecar: write zeroes: %w", s.r.Path(), syscall.ENOTSUP)
}

// member is a replica of an attach, local or remote.
type member interface {
	quorum.Child
	name() string
	Meta() replica.Meta
	BlockSize() int64
	// reach reads from the replica, fencing nobody: whether a takeover
	// would get through.
	reach(ctx context.Context) error
	// takeOver fences the replica's previous holder and reads its
	// metadata again.
	takeOver(ctx context.Context) error
	updateMeta(ctx context.Context, fn func(*replica.Meta)) error
	writeJournal(ctx context.Context, e replica.JournalEntry, slotSize int64) error
	readJournal(ctx context.Context, slotSize int64) (replica.JournalEntry, bool, error)
	Close() error
}

type localReplica struct{ *replica.File }

func (l localReplica) name() string { return l.Path() }

// reach and takeOver have nothing to do: the image is open and locked
// by this process.
func (l localReplica) reach(context.Context) error    { return nil }
func (l localReplica) takeOver(context.Context) error { return nil }

func (l localReplica) updateMeta(_ context.Context, fn func(*replica.Meta)) error {
	return l.UpdateMeta(fn)
}

func (l localReplica) writeJournal(_ context.Context, e replica.JournalEntry, slotSize int64) error {
	return l.WriteJournal(e, slotSize)
}

func (l localReplica) readJournal(_ context.Context, slotSize int64) (replica.JournalEntry, bool, error) {
	return l.ReadJournal(slotSize)
}

// remoteReplica is a replica behind a replica server: its image export
// is the engine's child, its sidecar export carries metadata and journal.
type remoteReplica struct {
	*nbd.Client // the image
	side        *nbd.Client
	spec        string
	epoch       uint64

	mu   sync.Mutex
	meta replica.Meta
}

// openRemote connects to the replica at an NBD URI, presenting epoch
// unless the URI carries one, and loads its metadata, taking nothing
// over.
func openRemote(ctx context.Context, spec string, epoch uint64, timeout time.Duration, log *slog.Logger) (_ *remoteReplica, err error) {
	cfg, err := nbd.ParseURI(spec)
	if err != nil {
		return nil, err
	}
	if cfg.Epoch == 0 {
		cfg.Epoch = epoch
	}
	if cfg.Epoch == 0 {
		return nil, fmt.Errorf("replica %s: a remote replica needs an epoch, newer than the last attach's (give --epoch N, or NAME@epoch=N in the URI)", spec)
	}
	cfg.Logger, cfg.Timeout = log, timeout
	r := &remoteReplica{spec: spec, epoch: cfg.Epoch}
	if r.Client, err = nbd.Dial(ctx, cfg); err != nil {
		return nil, fmt.Errorf("replica %s: %w", spec, err)
	}
	defer func() {
		if err != nil {
			r.Close()
		}
	}()
	side := cfg
	side.Export += SidecarSuffix
	if r.side, err = nbd.Dial(ctx, side); err != nil {
		return nil, fmt.Errorf("replica %s: metadata export (is this a quorum replica server?): %w", spec, err)
	}
	if err := r.loadMeta(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *remoteReplica) loadMeta(ctx context.Context) error {
	block := make([]byte, metaBlock)
	if err := r.side.ReadAt(ctx, block, 0); err != nil {
		return fmt.Errorf("replica %s: read metadata: %w", r.spec, err)
	}
	m, err := replica.ParseMeta(bytes.TrimRight(block, "\x00"), r.spec)
	if err != nil {
		return err
	}
	if m.Size != r.Client.Size() {
		return fmt.Errorf("replica %s: export has %d bytes, its metadata says %d", r.spec, r.Client.Size(), m.Size)
	}
	r.mu.Lock()
	r.meta = m
	r.mu.Unlock()
	return nil
}

func (r *remoteReplica) reach(ctx context.Context) error { return r.loadMeta(ctx) }

func (r *remoteReplica) takeOver(ctx context.Context) error {
	if err := r.Client.Flush(ctx); err != nil {
		return fmt.Errorf("replica %s: take over with epoch %d: %w", r.spec, r.epoch, err)
	}
	if err := r.side.Flush(ctx); err != nil {
		return fmt.Errorf("replica %s: take over metadata with epoch %d: %w", r.spec, r.epoch, err)
	}
	return r.loadMeta(ctx)
}

func (r *remoteReplica) name() string { return r.spec }

// fencedError is an NBD client's fencing as the engine knows it: the
// attach lost the volume, no replica failed (see quorum.ErrFenced).
type fencedError struct{ error }

func (f fencedError) Is(target error) bool { return target == quorum.ErrFenced }
func (f fencedError) Unwrap() error        { return f.error }

func asFenced(err error) error {
	if errors.Is(err, nbd.ErrFenced) {
		return fencedError{err}
	}
	return err
}

func (r *remoteReplica) ReadAt(ctx context.Context, p []byte, off int64) error {
	return asFenced(r.Client.ReadAt(ctx, p, off))
}

func (r *remoteReplica) WriteAt(ctx context.Context, p []byte, off int64) error {
	return asFenced(r.Client.WriteAt(ctx, p, off))
}

func (r *remoteReplica) Flush(ctx context.Context) error { return asFenced(r.Client.Flush(ctx)) }

func (r *remoteReplica) Discard(ctx context.Context, off, length int64) error {
	return asFenced(r.Client.Discard(ctx, off, length))
}

func (r *remoteReplica) WriteZeroes(ctx context.Context, off, length int64) error {
	return asFenced(r.Client.WriteZeroes(ctx, off, length))
}

func (r *remoteReplica) Meta() replica.Meta {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.meta
}

func (r *remoteReplica) updateMeta(ctx context.Context, fn func(*replica.Meta)) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.meta
	fn(&m)
	block := make([]byte, metaBlock)
	b := m.Marshal()
	if len(b) > metaBlock {
		return fmt.Errorf("replica %s: metadata of %d bytes exceeds its block", r.spec, len(b))
	}
	copy(block, b)
	if err := r.side.WriteAt(ctx, block, 0); err != nil {
		return fmt.Errorf("replica %s: write metadata: %w", r.spec, asFenced(err))
	}
	r.meta = m
	return nil
}

// checkJournalArea refuses a sidecar too small for this attach's
// journal slots.
func (r *remoteReplica) checkJournalArea(slotSize int64) error {
	if need := metaBlock + 2*slotSize; r.side.Size() < need {
		return fmt.Errorf("replica %s: metadata export has %d bytes, this attach's journal needs %d", r.spec, r.side.Size(), need)
	}
	return nil
}

func (r *remoteReplica) writeJournal(ctx context.Context, e replica.JournalEntry, slotSize int64) error {
	b, err := replica.EncodeJournal(e, slotSize)
	if err != nil {
		return fmt.Errorf("replica %s: %w", r.spec, err)
	}
	if err := r.side.WriteAt(ctx, b, metaBlock+replica.JournalSlot(e.Seq, slotSize)); err != nil {
		return fmt.Errorf("replica %s: write journal: %w", r.spec, asFenced(err))
	}
	if err := r.side.Flush(ctx); err != nil {
		return fmt.Errorf("replica %s: sync journal: %w", r.spec, asFenced(err))
	}
	return nil
}

func (r *remoteReplica) readJournal(ctx context.Context, slotSize int64) (replica.JournalEntry, bool, error) {
	e, ok, err := replica.ReadJournalFrom(readerAt{ctx: ctx, c: r.side, base: metaBlock}, slotSize)
	if err != nil {
		return e, false, fmt.Errorf("replica %s: read journal: %w", r.spec, err)
	}
	return e, ok, nil
}

func (r *remoteReplica) Close() error {
	var errs []error
	if r.side != nil {
		errs = append(errs, r.side.Close())
	}
	if r.Client != nil {
		errs = append(errs, r.Client.Close())
	}
	return errors.Join(errs...)
}

// readerAt reads an NBD export from base as an io.ReaderAt.
type readerAt struct {
	ctx  context.Context
	c    *nbd.Client
	base int64
}

func (ra readerAt) ReadAt(p []byte, off int64) (int, error) {
	if err := ra.c.ReadAt(ra.ctx, p, ra.base+off); err != nil {
		return 0, err
	}
	return len(p), nil
}
