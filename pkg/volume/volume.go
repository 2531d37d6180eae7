// Package volume assembles replicas into a quorum engine: local replica
// images and replicas behind replica servers (NBD, see remote.go). It
// checks that the replicas belong together, finds the ones that missed
// writes, and keeps their metadata (generation, clean state) and the
// journal in step with the engine's life.
package volume

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/quorum-csi/quorum-csi/pkg/nbd"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
)

// Options are the engine settings of an attach.
type Options struct {
	VoteThreshold    int
	ReadPattern      quorum.ReadPattern
	RewriteCorrupted bool
	Strict           bool
	OnEvent          func(quorum.Event)
	// FaultFiles maps a replica path to a control file: while that file
	// exists, every request to the replica fails with EIO. For testing
	// failure handling on a running volume.
	FaultFiles map[string]string
	// Epoch is presented to replica servers for remote replicas whose
	// URI carries no epoch of its own; it must be newer than (or equal to)
	// the last attach's, and taking the replicas over fences that attach.
	Epoch uint64
	// RequestTimeout bounds each request to a remote replica (default
	// 30s), the wait for a reconnect included: a replica server that
	// restarts within it costs a stall, not the replica (see package
	// nbd). A request that takes longer fails, and the replica is left
	// out until it answers again.
	RequestTimeout time.Duration
	// Logger receives the NBD clients' connection losses and reconnects.
	Logger *slog.Logger
	// WithoutJournal runs the engine with no journal, to measure what the
	// journal costs (bench only): no write intent, so a crash leaves the
	// replicas unreconciled, and faults are not persisted.
	WithoutJournal bool
	// Standby opens the volume as a live migration's target while
	// another attach (with an older epoch) still writes: it takes
	// nothing over and writes nothing, serves reads, and its first
	// write-class request (or Activate) does what Open does otherwise
	// (see Volume.activate). Every replica must be remote, since only a
	// replica server can fence the other attach.
	Standby bool

	// wrapChild lets tests put a fault injector around a replica.
	wrapChild func(i int, c quorum.Child) quorum.Child
	// geometry lets tests use small regions and extents.
	regionSize, extentSize int64
	activeExtents          int
}

// Volume is an open, assembled volume.
type Volume struct {
	*quorum.Engine
	replicas    []member
	journal     *journal
	stopWatches context.CancelFunc
	// Unclean and Stale are what the activation (at Open, or for a
	// standby at its first write-class request) found; read them once
	// Activated is closed. Unclean lists replicas whose last attach did
	// not detach cleanly (for a standby: the attach it took over from),
	// Stale those that missed writes and are being resynced.
	Unclean []string
	Stale   []string
	// ActivatedIn is how long the activation took.
	ActivatedIn time.Duration
	scrub       scrubState
	standby     bool
	log         *slog.Logger
}

// Open opens and checks the replicas, in fifo order: paths of local
// images, or NBD URIs of replicas on replica servers (nbd://, nbds://,
// nbd+unix://). Unless opts.Standby, it then activates the volume: it
// takes the remote replicas over (fencing the last attach), starts
// recovering from a crash of the last attach (quorum.Engine.Recover: the
// in-sync replicas become identical where they may differ, before any
// request there and in the background) and starts resyncing replicas
// that missed writes; nothing is written unless every check passed.
func Open(ctx context.Context, paths []string, opts Options) (_ *Volume, err error) {
	if err := distinct(paths); err != nil {
		return nil, err
	}
	if opts.Standby {
		for _, p := range paths {
			if !nbd.IsURI(p) {
				return nil, fmt.Errorf("replica %s: a standby attach needs every replica behind a replica server (an NBD URI): a local image cannot fence the active attach", p)
			}
		}
	}
	v := &Volume{standby: opts.Standby, log: cmp.Or(opts.Logger, slog.Default())}
	defer func() {
		if err != nil {
			if v.Engine != nil {
				v.Engine.Close()
			}
			v.closeFiles()
		}
	}()
	for _, p := range paths {
		var m member
		if nbd.IsURI(p) {
			r, err := openRemote(ctx, p, opts.Epoch, opts.RequestTimeout, v.log)
			if err != nil {
				return nil, err
			}
			m = r
		} else {
			r, err := replica.Open(p)
			if err != nil {
				return nil, err
			}
			m = localReplica{r}
		}
		v.replicas = append(v.replicas, m)
	}
	if err := checkSameVolume(v.replicas); err != nil {
		return nil, err
	}
	region := cmp.Or(opts.regionSize, quorum.DefaultRegionSize)
	extent := cmp.Or(opts.extentSize, quorum.DefaultExtentSize)
	activeExtents := cmp.Or(opts.activeExtents, quorum.DefaultActiveExtents)
	size := v.replicas[0].Size()
	j := &journal{replicas: v.replicas, slotSize: slotSize(size, region, activeExtents), region: region, extent: extent}
	v.journal = j
	for _, r := range v.replicas {
		if rr, ok := r.(*remoteReplica); ok {
			if err := rr.checkJournalArea(j.slotSize); err != nil {
				return nil, err
			}
		}
	}
	// What the replicas say before the takeover only decides what a
	// standby reads; the activation reads it all again.
	rec, err := j.newest(ctx, nil)
	if err != nil {
		return nil, err
	}
	st, err := v.syncState(rec, nil)
	if err != nil {
		return nil, err
	}
	cfg := quorum.Config{
		VoteThreshold:    opts.VoteThreshold,
		ReadPattern:      opts.ReadPattern,
		RewriteCorrupted: opts.RewriteCorrupted,
		Strict:           opts.Strict,
		OnEvent:          opts.OnEvent,
		Journal:          j,
		RegionSize:       region,
		ExtentSize:       extent,
		ActiveExtents:    activeExtents,
		Standby:          v.activate,
	}
	watchCtx, stopWatches := context.WithCancel(context.Background())
	v.stopWatches = stopWatches
	for p := range opts.FaultFiles {
		if !slices.Contains(paths, p) {
			return nil, fmt.Errorf("fault file for %s, which is not a replica of this attach", p)
		}
	}
	for i, r := range v.replicas {
		var c quorum.Child = r
		if control, ok := opts.FaultFiles[r.name()]; ok {
			c = watchFaults(watchCtx, c, control, 50*time.Millisecond)
		}
		if opts.wrapChild != nil {
			c = opts.wrapChild(i, c)
		}
		cfg.Children = append(cfg.Children, quorum.Member{Name: r.name(), Child: c, Dirty: st.dirty[i]})
	}
	if opts.WithoutJournal {
		cfg.Journal = nil
	}
	if v.Engine, err = quorum.New(cfg); err != nil {
		return nil, err
	}
	if !opts.Standby {
		if err := v.Engine.Activate(ctx); err != nil {
			return nil, fmt.Errorf("open volume: %w", err)
		}
	}
	return v, nil
}

// syncState is what the replicas' metadata and the journal's newest
// record say of each replica.
type syncState struct {
	dirty          []*quorum.Bitmap // by replica; nil: in sync
	stale, unclean []string
	generation     uint64 // the newest
}

func (v *Volume) syncState(rec record, leftOut map[int]bool) (syncState, error) {
	var st syncState
	for i, r := range v.replicas {
		if !leftOut[i] {
			st.generation = max(st.generation, r.Meta().Generation)
		}
	}
	size, region := v.replicas[0].Size(), v.journal.region
	for i, r := range v.replicas {
		m := r.Meta()
		var d *quorum.Bitmap
		if words, ok := rec.dirty[m.ReplicaID]; ok && !leftOut[i] {
			d = quorum.NewBitmap(size, region)
			d.Load(words)
		} else if m.Generation < st.generation || leftOut[i] {
			// Left out of an attach, or a replacement: what it misses is
			// unknown, so it gets everything.
			d = quorum.NewBitmap(size, region)
			d.SetRange(0, size)
		}
		if d != nil {
			st.stale = append(st.stale, r.name())
		}
		if m.State != replica.StateClean {
			st.unclean = append(st.unclean, r.name())
		}
		st.dirty = append(st.dirty, d)
	}
	if len(st.stale) == len(v.replicas) {
		return st, fmt.Errorf("no replica is in sync: %v all missed writes; give at least one in-sync replica", st.stale)
	}
	return st, nil
}

// activate takes the replicas over (quorum.Activator): it fences the
// last attach on every replica before it reads their metadata and
// journal again, so that what it reads is final, and then does what
// attaching after a crash of that attach does.
//
// A replica that cannot be reached (its node cut off since a standby
// connected, say) is left out, as long as every write the last attach
// acknowledged is still on a replica taken over: each stands on at
// least vote-threshold replicas, so n-t+1 of them suffice. Which are
// reachable is asked first, with reads that fence nobody, so that an
// activation without enough replicas leaves the last attach writing.
// One left out keeps its generation and is resynced in full when it
// returns (the next attach would do the same, from its older
// generation). A replica that a newer epoch holds fails the
// activation: this attach has lost the volume.
func (v *Volume) activate(ctx context.Context, takeOver func(quorum.Activation) error) (err error) {
	start := time.Now()
	if v.standby {
		v.log.Info("activating the standby: taking the replicas over")
		defer func() {
			if err != nil {
				v.log.Error("standby activation failed; the requests that waited for it fail, the next write tries again", "error", err, "after", time.Since(start).String())
			}
		}()
	}
	leftOut := map[int]bool{}
	unreachable := v.eachReplica(func(_ int, r member) error { return r.reach(ctx) })
	for i, err := range unreachable {
		if errors.Is(err, nbd.ErrFenced) {
			return err
		}
		if err != nil {
			leftOut[i] = true
		}
	}
	n, t := len(v.replicas), v.Engine.VoteThreshold()
	if need := n - t + 1; n-len(leftOut) < need {
		return fmt.Errorf("%d of %d replicas reachable, %d needed to hold every acknowledged write (vote threshold %d): %w", n-len(leftOut), n, need, t, errors.Join(unreachable...))
	}
	errs := v.eachReplica(func(i int, r member) error {
		if leftOut[i] {
			return nil
		}
		return r.takeOver(ctx)
	})
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for i := range leftOut {
		v.log.Warn("replica left out of the activation: unreachable; resynced in full when it returns", "replica", v.replicas[i].name(), "error", unreachable[i])
	}
	rec, err := v.journal.newest(ctx, leftOut)
	if err != nil {
		return err
	}
	st, err := v.syncState(rec, leftOut)
	if err != nil {
		return err
	}
	for i, r := range v.replicas {
		if leftOut[i] {
			continue
		}
		if err := r.updateMeta(ctx, func(m *replica.Meta) {
			m.Generation = st.generation + 1
			m.State = replica.StateOpen
		}); err != nil {
			return err
		}
	}
	if err := takeOver(quorum.Activation{Dirty: st.dirty, Active: rec.active}); err != nil {
		return err
	}
	v.Stale, v.Unclean = st.stale, st.unclean
	v.ActivatedIn = time.Since(start)
	return nil
}

// eachReplica runs fn on every replica at once and returns their errors,
// by replica.
func (v *Volume) eachReplica(fn func(int, member) error) []error {
	errs := make([]error, len(v.replicas))
	var wg sync.WaitGroup
	for i, r := range v.replicas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(i, r)
		}()
	}
	wg.Wait()
	return errs
}

// checkSameVolume refuses replicas that are not distinct replicas of one
// volume.
func checkSameVolume(rs []member) error {
	first := rs[0].Meta()
	ids := map[string]string{}
	for _, r := range rs {
		m := r.Meta()
		if m.VolumeID != first.VolumeID {
			return fmt.Errorf("replica %s belongs to volume %s, but %s belongs to volume %s", r.name(), m.VolumeID, rs[0].name(), first.VolumeID)
		}
		if m.Size != first.Size {
			return fmt.Errorf("replicas differ in size: %s has %d bytes, %s has %d", rs[0].name(), first.Size, r.name(), m.Size)
		}
		if other, ok := ids[m.ReplicaID]; ok {
			return fmt.Errorf("replicas %s and %s are the same replica (a copied image?): both have replica id %s", other, r.name(), m.ReplicaID)
		}
		ids[m.ReplicaID] = r.name()
	}
	return nil
}

// BlockSize is the smallest request size every replica can take.
func (v *Volume) BlockSize() int64 {
	var bs int64 = 512
	for _, r := range v.replicas {
		bs = max(bs, r.BlockSize())
	}
	return bs
}

// Close stops resyncs, flushes the volume, records that no write is in
// flight, marks the in-sync replicas clean and releases them. Replicas
// out of sync stay marked open, and the journal keeps what they miss.
// A standby that was never activated writes nothing.
func (v *Volume) Close(ctx context.Context) error {
	v.Engine.Close()
	if v.Standby() {
		// Its replicas are another attach's: their state is not ours
		// to mark.
		return v.closeFiles()
	}
	err := v.Shutdown(ctx)
	if err != nil {
		err = fmt.Errorf("close volume: %w", err)
	} else {
		for i, r := range v.replicas {
			if v.Faulty(i) {
				continue
			}
			if uerr := r.updateMeta(ctx, func(m *replica.Meta) { m.State = replica.StateClean }); uerr != nil {
				err = errors.Join(err, uerr)
			}
		}
	}
	return errors.Join(err, v.closeFiles())
}

func (v *Volume) closeFiles() error {
	if v.stopWatches != nil {
		v.stopWatches()
	}
	var errs []error
	for _, r := range v.replicas {
		errs = append(errs, r.Close())
	}
	v.replicas = nil
	return errors.Join(errs...)
}

// distinct refuses a list that names one replica twice: local paths by
// file, URIs by their text (the identity check at Open catches the rest).
func distinct(specs []string) error {
	if len(specs) == 0 {
		return errors.New("no replicas given")
	}
	var paths []string
	seen := map[string]bool{}
	for _, s := range specs {
		if !nbd.IsURI(s) {
			paths = append(paths, s)
			continue
		}
		if seen[s] {
			return fmt.Errorf("replica %s given twice", s)
		}
		seen[s] = true
	}
	if len(paths) == 0 {
		return nil
	}
	return replica.Distinct(paths)
}

// ID is the volume's id, shared by its replicas.
func (v *Volume) ID() string { return v.replicas[0].Meta().VolumeID }
