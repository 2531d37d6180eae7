// Package volume assembles replica images into a quorum engine: it checks
// that the replicas belong together, refuses stale ones, and keeps their
// metadata (generation, clean state, stale replicas) in step with the
// engine's life.
package volume

import (
	"context"
	"errors"
	"fmt"
	"slices"

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

	// wrapChild lets tests put a fault injector around a replica.
	wrapChild func(i int, c quorum.Child) quorum.Child
}

// Volume is an open, assembled volume.
type Volume struct {
	*quorum.Engine
	replicas []*replica.File
	// Unclean lists replicas whose last attach did not detach cleanly.
	Unclean []string
}

// Open opens and checks the replicas at paths, in fifo order, and marks
// them open under a new generation. Nothing is written unless every check
// passed.
func Open(paths []string, opts Options) (_ *Volume, err error) {
	if err := replica.Distinct(paths); err != nil {
		return nil, err
	}
	v := &Volume{}
	defer func() {
		if err != nil {
			v.closeFiles()
		}
	}()
	for _, p := range paths {
		r, err := replica.Open(p)
		if err != nil {
			return nil, err
		}
		v.replicas = append(v.replicas, r)
	}
	if err := checkSameVolume(v.replicas); err != nil {
		return nil, err
	}
	if err := checkFresh(v.replicas); err != nil {
		return nil, err
	}
	cfg := quorum.Config{
		VoteThreshold:    opts.VoteThreshold,
		ReadPattern:      opts.ReadPattern,
		RewriteCorrupted: opts.RewriteCorrupted,
		Strict:           opts.Strict,
		OnEvent:          opts.OnEvent,
		OnFaulty:         v.recordStale,
	}
	for i, r := range v.replicas {
		var c quorum.Child = r
		if opts.wrapChild != nil {
			c = opts.wrapChild(i, c)
		}
		cfg.Children = append(cfg.Children, quorum.Member{Name: r.Path(), Child: c})
	}
	if v.Engine, err = quorum.New(cfg); err != nil {
		return nil, err
	}
	var gen uint64
	for _, r := range v.replicas {
		m := r.Meta()
		gen = max(gen, m.Generation)
		if m.State != replica.StateClean {
			v.Unclean = append(v.Unclean, r.Path())
		}
	}
	for _, r := range v.replicas {
		if err := r.UpdateMeta(func(m *replica.Meta) {
			m.Generation = gen + 1
			m.State = replica.StateOpen
		}); err != nil {
			return nil, fmt.Errorf("open volume: %w", err)
		}
	}
	return v, nil
}

// checkSameVolume refuses replicas that are not distinct replicas of one
// volume.
func checkSameVolume(rs []*replica.File) error {
	first := rs[0].Meta()
	ids := map[string]string{}
	for _, r := range rs {
		m := r.Meta()
		if m.VolumeID != first.VolumeID {
			return fmt.Errorf("replica %s belongs to volume %s, but %s belongs to volume %s", r.Path(), m.VolumeID, rs[0].Path(), first.VolumeID)
		}
		if m.Size != first.Size {
			return fmt.Errorf("replicas differ in size: %s has %d bytes, %s has %d", rs[0].Path(), first.Size, r.Path(), m.Size)
		}
		if other, ok := ids[m.ReplicaID]; ok {
			return fmt.Errorf("replicas %s and %s are the same replica (a copied image?): both have replica id %s", other, r.Path(), m.ReplicaID)
		}
		ids[m.ReplicaID] = r.Path()
	}
	return nil
}

// checkFresh refuses replicas that missed writes the others have.
func checkFresh(rs []*replica.File) error {
	var maxGen uint64
	for _, r := range rs {
		maxGen = max(maxGen, r.Meta().Generation)
	}
	for _, r := range rs {
		m := r.Meta()
		if m.Generation < maxGen {
			return fmt.Errorf("replica %s is stale: it is at generation %d while others are at %d, so it missed writes; leave it out (resync of stale replicas is not available yet)", r.Path(), m.Generation, maxGen)
		}
		for _, o := range rs {
			if om := o.Meta(); om.Generation >= m.Generation && om.IsStale(m.ReplicaID) {
				return fmt.Errorf("replica %s is stale: %s recorded that it failed and missed writes; leave it out (resync of stale replicas is not available yet)", r.Path(), o.Path())
			}
		}
	}
	return nil
}

// recordStale is the engine's OnFaulty: the healthy replicas remember that
// replica i missed writes, before the write that it missed is acknowledged.
func (v *Volume) recordStale(_ context.Context, i int, _ error) error {
	id := v.replicas[i].Meta().ReplicaID
	var errs []error
	for j, r := range v.replicas {
		if j == i || v.Faulty(j) {
			continue
		}
		if err := r.UpdateMeta(func(m *replica.Meta) {
			if !slices.Contains(m.Stale, id) {
				m.Stale = append(m.Stale, id)
			}
		}); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// BlockSize is the smallest request size every replica can take.
func (v *Volume) BlockSize() int64 {
	var bs int64 = 512
	for _, r := range v.replicas {
		bs = max(bs, r.BlockSize())
	}
	return bs
}

// Close flushes the volume, marks the healthy replicas clean and releases
// them. Faulty replicas stay marked open.
func (v *Volume) Close(ctx context.Context) error {
	err := v.Flush(ctx)
	if err != nil {
		err = fmt.Errorf("close volume: %w", err)
	} else {
		for i, r := range v.replicas {
			if v.Faulty(i) {
				continue
			}
			if uerr := r.UpdateMeta(func(m *replica.Meta) { m.State = replica.StateClean }); uerr != nil {
				err = errors.Join(err, uerr)
			}
		}
	}
	return errors.Join(err, v.closeFiles())
}

func (v *Volume) closeFiles() error {
	var errs []error
	for _, r := range v.replicas {
		errs = append(errs, r.Close())
	}
	v.replicas = nil
	return errors.Join(errs...)
}
