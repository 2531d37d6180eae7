// Package datapath is the node's data path as a long-lived service:
// it serves each staged volume as a block device (an attached volume of
// package volume: engine, frontend, probe, scrub, metrics), persists
// what it serves under its state folder, and takes every device back
// when it starts again after a crash, a restart or an upgrade, so the
// volumes' users (filesystems, VMs) see their requests wait, never fail.
//
// Who owns what on a node:
//   - the CSI node plugin (package csi) answers the kubelet: it asks this
//     service to stage and unstage, and mounts the device it gets;
//     restarting it never touches a device;
//   - this service, in its own process (cmd/datapath), owns the engines
//     and the devices, and the records of what it serves;
//   - a FUSE descriptor holder (package attach), in a process of its
//     own, keeps each FUSE+loop device's connection open while no data
//     path process runs; ublk devices wait in the kernel (user recovery).
//
// A successor takes over in one of two ways. Planned (an upgrade): it
// asks the running service to hand over (Handover); that one stops
// taking requests, answers those in flight, closes its volumes cleanly
// and lets go, and the successor takes the devices back. Unplanned (a
// crash, kill -9): the successor finds the records, recovers each
// volume's write intent, takes the device back and has the kernel resend
// what the dead process had taken but not answered.
package datapath

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quorum-csi/quorum-csi/pkg/attach"
	"github.com/quorum-csi/quorum-csi/pkg/metrics"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// Errors the API maps to codes the CSI node service understands.
var (
	ErrNotFound = errors.New("not staged on this node")
	ErrConflict = errors.New("staged differently")
	ErrBusy     = errors.New("in use")
	ErrNotReady = errors.New("the data path is still taking its volumes back")
)

// Config configures a Service.
type Config struct {
	// StateDir holds the records (StateDir/volumes), the devices' state
	// files, the FUSE descriptor holders' sockets and FUSE mount points.
	StateDir string
	// HolderSocket is the FUSE descriptor holder to put FUSE+loop
	// devices' connections into (volume.AttachConfig.HolderSocket).
	HolderSocket string
	// Frontend is a resolved frontend for volumes staged from now on;
	// volumes taken back keep the one they were made with.
	Frontend string
	// RequestTimeout bounds each request to a replica server.
	RequestTimeout time.Duration
	// ProbeInterval, ScrubRate and ScrubInterval as in
	// volume.AttachConfig.
	ProbeInterval time.Duration
	ScrubRate     int64
	ScrubInterval time.Duration
	// TakeOverTimeout bounds the attempts to take one volume back at
	// start (its replica servers may be starting too); default 2m.
	TakeOverTimeout time.Duration
	// Metrics, if set, measures every served volume.
	Metrics *metrics.Set
	// OnEvent receives each volume's engine events (QUORUM_FAILURE,
	// REPORT_BAD), e.g. to record Kubernetes Events.
	OnEvent func(volumeID string, e quorum.Event)
	Logger  *slog.Logger
}

// Service serves the node's staged volumes.
type Service struct {
	cfg   Config
	store store
	log   *slog.Logger
	ready atomic.Bool

	// life is held shared by whatever may add a served volume (Stage, the
	// takeover of a recorded one) and exclusively by Handover, which sets
	// closing first: a volume added after Handover looked would be
	// served by two processes at once once the successor took it back.
	life    sync.RWMutex
	closing atomic.Bool
	// stopTakeOver ends a TakeOver in progress (Handover); set under mu.
	stopTakeOver context.CancelFunc

	// locks serialises the operations on one volume.
	locksMu sync.Mutex
	locks   map[string]*sync.Mutex

	mu   sync.Mutex
	vols map[string]*served
}

// served is one staged volume: serving (av set) or lost (lost set).
type served struct {
	rec  Record
	av   *volume.Attached
	lost string
}

// New returns a service that serves nothing yet: call TakeOver first.
func New(cfg Config) (*Service, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("data path: a state folder is required")
	}
	var err error
	if cfg.Frontend, err = attach.ResolveFrontend(cfg.Frontend); err != nil {
		return nil, fmt.Errorf("data path: %w", err)
	}
	cfg.TakeOverTimeout = cmp.Or(cfg.TakeOverTimeout, 2*time.Minute)
	return &Service{
		cfg:   cfg,
		store: store{dir: filepath.Join(cfg.StateDir, "volumes")},
		log:   cmp.Or(cfg.Logger, slog.Default()),
		locks: map[string]*sync.Mutex{},
		vols:  map[string]*served{},
	}, nil
}

// Frontend is the frontend new volumes are staged with.
func (s *Service) Frontend() string { return s.cfg.Frontend }

// Ready reports whether every volume staged before the start was taken
// back (or found lost).
func (s *Service) Ready() bool { return s.ready.Load() }

func (s *Service) lock(id string) func() {
	s.locksMu.Lock()
	l, ok := s.locks[id]
	if !ok {
		l = &sync.Mutex{}
		s.locks[id] = l
	}
	s.locksMu.Unlock()
	l.Lock()
	return l.Unlock
}

// TakeOver serves every volume the records name: each device is taken
// back (or made anew if it is gone, since its users then are gone too).
// A volume that cannot be served is recorded as lost, reported, and its
// record removed, so the CSI node service can unstage it cleanly. The
// service is ready when TakeOver returns.
func (s *Service) TakeOver(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.mu.Lock()
	s.stopTakeOver = cancel
	s.mu.Unlock()
	defer func() { s.ready.Store(!s.closing.Load()) }()
	recs, bad, err := s.store.load()
	if err != nil {
		s.log.Error("read the staged volumes' records", "error", err)
	}
	for _, b := range bad {
		s.markLost(Record{StageRequest: StageRequest{VolumeID: b.volumeID}}, b.err.Error())
	}
	var wg sync.WaitGroup
	for _, r := range recs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.takeBack(ctx, r)
		}()
	}
	wg.Wait()
}

// takeBack serves one recorded volume again, retrying while its replica
// servers (this node's among them, in the same process) come up. After
// a Handover began it leaves the volume, record and all, to the
// successor.
func (s *Service) takeBack(ctx context.Context, r Record) {
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closing.Load() {
		return
	}
	defer s.lock(r.VolumeID)()
	ctx, cancel := context.WithTimeout(ctx, s.cfg.TakeOverTimeout)
	defer cancel()
	start := time.Now()
	for attempt := 1; ; attempt++ {
		av, err := s.attach(ctx, r)
		if err == nil && !av.Device.TakenBack() {
			// The device its users held is gone (a reboot of the kernel's
			// side, a holder that died with no server): a new one would
			// serve nobody. Lost, and cleaned up.
			s.markLost(r, fmt.Sprintf("device %s is gone (%s made %s instead)", r.Device, r.Frontend, av.Device.Path()))
			if err := av.ForceDetach(); err != nil {
				s.log.Error("remove the device made in place of a lost one", "volume", r.VolumeID, "error", err)
			}
			return
		}
		if err == nil {
			s.mu.Lock()
			s.vols[r.VolumeID] = &served{rec: r, av: av}
			s.mu.Unlock()
			s.log.Info("took the volume back", "volume", r.VolumeID, "device", av.Device.Path(), "frontend", r.Frontend,
				"attempts", attempt, "took", time.Since(start).String())
			return
		}
		if s.closing.Load() {
			s.log.Info("handing over: leaving the volume to the successor", "volume", r.VolumeID, "error", err)
			return
		}
		s.log.Warn("take the volume back", "volume", r.VolumeID, "attempt", attempt, "error", err)
		select {
		case <-ctx.Done():
			if !s.closing.Load() {
				s.markLost(r, fmt.Sprintf("take back %s: %v", r.Device, err))
			}
			return
		case <-time.After(min(time.Duration(attempt)*250*time.Millisecond, 5*time.Second)):
		}
	}
}

// markLost records a volume the data path cannot serve and removes its
// record and device state: it will not be taken back, and NodeUnstage
// then finds it lost and cleans up without an error. The CSI node
// plugin's watcher shows it in the API (agent.DataPathWatcher).
func (s *Service) markLost(r Record, reason string) {
	s.log.Error("staged volume lost: the data path cannot serve it; unstage it (its pods must be restarted)", "volume", r.VolumeID, "device", r.Device, "reason", reason)
	s.mu.Lock()
	s.vols[r.VolumeID] = &served{rec: r, lost: reason}
	s.mu.Unlock()
	if err := s.store.remove(r.VolumeID); err != nil {
		s.log.Error("remove the lost volume's record", "volume", r.VolumeID, "error", err)
	}
	if r.Frontend != "" {
		if err := os.Remove(volume.DeviceStateFile(s.cfg.StateDir, r.Frontend, r.VolumeID)); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.log.Error("remove the lost volume's device state", "volume", r.VolumeID, "error", err)
		}
	}
}

// attach makes (or takes back) the volume's device as the record says.
func (s *Service) attach(ctx context.Context, r Record) (*volume.Attached, error) {
	pattern, err := quorum.ParseReadPattern(r.ReadPattern)
	if err != nil {
		return nil, fmt.Errorf("volume %s: read pattern: %w", r.VolumeID, err)
	}
	id := r.VolumeID
	return volume.Attach(ctx, volume.AttachConfig{
		Replicas: r.Replicas,
		Options: volume.Options{
			VoteThreshold:    r.VoteThreshold,
			ReadPattern:      pattern,
			RewriteCorrupted: r.RewriteCorrupted,
			Epoch:            r.Epoch,
			Standby:          r.Standby,
			RequestTimeout:   s.cfg.RequestTimeout,
			OnEvent: func(e quorum.Event) {
				if s.cfg.OnEvent != nil {
					s.cfg.OnEvent(id, e)
				}
			},
		},
		Frontend:      r.Frontend,
		StateDir:      s.cfg.StateDir,
		HolderSocket:  s.cfg.HolderSocket,
		ProbeInterval: s.cfg.ProbeInterval,
		ScrubRate:     s.cfg.ScrubRate,
		ScrubInterval: s.cfg.ScrubInterval,
		Metrics:       s.cfg.Metrics,
		Name:          id,
		Logger:        s.log.With("volume", id),
		// Not under the volume's lock: Unstage holds it while Detach
		// waits for the goroutine that calls this.
		OnActivated: func() { go s.recordActive(id) },
	})
}

// recordActive records that a standby volume was activated, so that a
// successor serves it active.
func (s *Service) recordActive(id string) {
	defer s.lock(id)()
	s.recordActiveLocked(id)
}

func (s *Service) recordActiveLocked(id string) {
	sv := s.get(id)
	if sv == nil || sv.av == nil || !sv.rec.Standby || sv.av.Standby() {
		return
	}
	r := sv.rec
	r.Standby = false
	if err := s.store.save(r); err != nil {
		s.log.Error("record the standby's activation (a successor would serve it as a standby again, whose first write then recovers it)", "volume", id, "error", err)
		return
	}
	s.mu.Lock()
	sv.rec = r
	s.mu.Unlock()
}

// Activate takes a standby volume's replicas over now (a live
// migration's switchover), rather than at its first write-class
// request. An active volume is no error.
func (s *Service) Activate(ctx context.Context, id string) error {
	defer s.lock(id)()
	av, err := s.serving(id)
	if err != nil {
		return err
	}
	start := time.Now()
	if err := av.Activate(ctx); err != nil {
		return fmt.Errorf("activate volume %s: %w", id, err)
	}
	s.recordActiveLocked(id)
	s.log.Info("activated", "volume", id, "took", time.Since(start).String())
	return nil
}

// Stage serves the volume as a block device and records it. Staging a
// volume that is already served the same way returns it (CSI calls are
// retried); served another way (other staging path or access type) is
// ErrConflict.
func (s *Service) Stage(ctx context.Context, req StageRequest) (Status, error) {
	if err := checkVolumeID(req.VolumeID); err != nil {
		return Status{}, err
	}
	if len(req.Replicas) == 0 || req.Epoch == 0 || req.StagingPath == "" {
		return Status{}, fmt.Errorf("stage volume %s: replicas, a positive epoch and a staging path are required", req.VolumeID)
	}
	if !s.Ready() {
		return Status{}, ErrNotReady
	}
	s.life.RLock()
	defer s.life.RUnlock()
	if s.closing.Load() {
		return Status{}, ErrNotReady
	}
	defer s.lock(req.VolumeID)()
	if sv := s.get(req.VolumeID); sv != nil {
		if sv.lost != "" {
			return Status{}, fmt.Errorf("stage volume %s: %w: it was lost (%s) and must be unstaged first", req.VolumeID, ErrConflict, sv.lost)
		}
		if sv.rec.StagingPath != req.StagingPath || sv.rec.Block != req.Block {
			return Status{}, fmt.Errorf("stage volume %s: %w: already staged at %s (block %t)", req.VolumeID, ErrConflict, sv.rec.StagingPath, sv.rec.Block)
		}
		return s.status(sv), nil
	}
	r := Record{StageRequest: req, Frontend: s.cfg.Frontend}
	// The engine and the device outlive the request that made them.
	av, err := s.attach(context.WithoutCancel(ctx), r)
	if err != nil {
		return Status{}, fmt.Errorf("stage volume %s with epoch %d: %w", req.VolumeID, req.Epoch, err)
	}
	r.Device = av.Device.Path()
	if err := s.store.save(r); err != nil {
		return Status{}, errors.Join(fmt.Errorf("stage volume %s: %w", req.VolumeID, err), av.ForceDetach())
	}
	sv := &served{rec: r, av: av}
	s.mu.Lock()
	s.vols[req.VolumeID] = sv
	s.mu.Unlock()
	s.log.Info("staged", "volume", req.VolumeID, "device", r.Device, "epoch", req.Epoch, "frontend", r.Frontend, "block", req.Block, "standby", req.Standby)
	return s.status(sv), nil
}

// Unstage removes the volume's device once nobody uses it (waiting until
// ctx ends, then ErrBusy: the volume stays staged), closes its engine
// and forgets its record. With force the device goes even while in use.
// A volume not staged here is no error.
func (s *Service) Unstage(ctx context.Context, id string, force bool) error {
	defer s.lock(id)()
	sv := s.get(id)
	if sv == nil {
		return nil
	}
	if sv.av != nil {
		var err error
		if force {
			err = sv.av.ForceDetach()
		} else {
			err = sv.av.Detach(ctx)
		}
		if errors.Is(err, attach.ErrBusy) {
			return fmt.Errorf("unstage volume %s: %s: %w", id, sv.rec.Device, ErrBusy)
		}
		if errors.Is(err, quorum.ErrFenced) {
			// A live migration's source after the switchover: the
			// replicas are the target's, so not marking them clean is
			// right, and the device is gone.
			s.log.Info("unstaging a volume another attachment took over", "volume", id, "error", err)
		} else if err != nil {
			return fmt.Errorf("unstage volume %s: %w", id, err)
		}
	}
	s.mu.Lock()
	delete(s.vols, id)
	s.mu.Unlock()
	if err := s.store.remove(id); err != nil {
		return err
	}
	s.log.Info("unstaged", "volume", id, "device", sv.rec.Device)
	return nil
}

// SetTarget records (published true) or forgets a target path of the
// volume.
func (s *Service) SetTarget(id, target string, single, published bool) error {
	defer s.lock(id)()
	sv := s.get(id)
	if sv == nil || sv.lost != "" {
		if !published {
			return nil
		}
		return fmt.Errorf("volume %s: %w", id, ErrNotFound)
	}
	r := sv.rec
	r.Targets = maps.Clone(r.Targets)
	if r.Targets == nil {
		r.Targets = map[string]bool{}
	}
	if published {
		r.Targets[target] = single
	} else {
		delete(r.Targets, target)
	}
	if err := s.store.save(r); err != nil {
		return err
	}
	s.mu.Lock()
	sv.rec = r
	s.mu.Unlock()
	return nil
}

func (s *Service) get(id string) *served {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.vols[id]
}

// Quiesce holds the volume's requests at a consistent cut (see
// volume.Attached.Quiesce) for at most maxHold: the engine of a snapshot
// across its replicas.
func (s *Service) Quiesce(ctx context.Context, id string, maxHold time.Duration) error {
	if maxHold <= 0 {
		return fmt.Errorf("quiesce volume %s: a positive hold is required", id)
	}
	defer s.lock(id)()
	av, err := s.serving(id)
	if err != nil {
		return err
	}
	start := time.Now()
	if err := av.Quiesce(ctx, maxHold); err != nil {
		return fmt.Errorf("quiesce volume %s: %w", id, err)
	}
	s.log.Info("quiesced", "volume", id, "took", time.Since(start).String(), "maxHold", maxHold.String())
	return nil
}

// Resume lets a quiesced volume's requests through again.
func (s *Service) Resume(id string) error {
	defer s.lock(id)()
	av, err := s.serving(id)
	if err != nil {
		return err
	}
	if err := av.Resume(); err != nil {
		return fmt.Errorf("resume volume %s: %w", id, err)
	}
	return nil
}

// serving returns the attached volume id, or an error if it is not
// served here.
func (s *Service) serving(id string) (*volume.Attached, error) {
	sv := s.get(id)
	if sv == nil {
		return nil, fmt.Errorf("volume %s: %w", id, ErrNotFound)
	}
	if sv.lost != "" {
		return nil, fmt.Errorf("volume %s: %w: it was lost (%s)", id, ErrConflict, sv.lost)
	}
	return sv.av, nil
}

// Status is a staged volume as the service reports it.
type Status struct {
	Record
	// Lost, when set, says why the data path cannot serve the volume.
	Lost string `json:"lost,omitempty"`
	// Replicas as the engine sees them, and the vote threshold.
	Children        []quorum.ChildStatus `json:"children,omitempty"`
	VoteThreshold   int                  `json:"voteThreshold"`
	Scrub           volume.ScrubProgress `json:"scrub"`
	DeviceTakenBack bool                 `json:"deviceTakenBack,omitempty"`
	// Quiesced: its requests are held for a snapshot.
	Quiesced bool `json:"quiesced,omitempty"`
	// Fenced: another attachment took the replicas over; this one can
	// write no more. (Record.Standby says whether it is still a standby.)
	Fenced bool `json:"fenced,omitempty"`
}

func (s *Service) status(sv *served) Status {
	s.mu.Lock()
	st := Status{Record: sv.rec, Lost: sv.lost}
	s.mu.Unlock()
	if sv.av != nil {
		st.Children = sv.av.Status()
		st.VoteThreshold = sv.av.VoteThreshold()
		st.Scrub = sv.av.ScrubProgress()
		st.DeviceTakenBack = sv.av.Device.TakenBack()
		st.Quiesced = sv.av.Quiesced()
		st.Standby = sv.av.Standby()
		st.Fenced = sv.av.Fenced()
	}
	return st
}

// Get reports one staged volume.
func (s *Service) Get(id string) (Status, error) {
	sv := s.get(id)
	if sv == nil {
		return Status{}, fmt.Errorf("volume %s: %w", id, ErrNotFound)
	}
	return s.status(sv), nil
}

// List reports every staged volume, by id.
func (s *Service) List() []Status {
	s.mu.Lock()
	all := slices.Collect(maps.Values(s.vols))
	s.mu.Unlock()
	out := make([]Status, 0, len(all))
	for _, sv := range all {
		out = append(out, s.status(sv))
	}
	slices.SortFunc(out, func(a, b Status) int { return cmp.Compare(a.VolumeID, b.VolumeID) })
	return out
}

// Handover is the planned end of this service, for a successor: a
// TakeOver in progress stops (the volumes it has not taken back yet
// stay recorded, for the successor), a Stage in progress finishes
// first, then every device stops taking requests, those in flight are
// answered, the volumes are closed cleanly and the devices left for the
// successor to take back. The records stay. The service serves nothing
// afterwards and stages nothing (ErrNotReady).
func (s *Service) Handover(ctx context.Context) error {
	s.ready.Store(false)
	s.closing.Store(true)
	s.mu.Lock()
	if s.stopTakeOver != nil {
		s.stopTakeOver()
	}
	s.mu.Unlock()
	s.life.Lock()
	defer s.life.Unlock()
	s.mu.Lock()
	all := slices.Collect(maps.Values(s.vols))
	s.mu.Unlock()
	var errs []error
	for _, sv := range all {
		unlock := s.lock(sv.rec.VolumeID)
		if sv.av != nil {
			start := time.Now()
			if err := sv.av.Release(ctx); err != nil {
				errs = append(errs, err)
			} else {
				s.log.Info("released the volume for a successor", "volume", sv.rec.VolumeID, "device", sv.rec.Device, "took", time.Since(start).String())
			}
		}
		s.mu.Lock()
		delete(s.vols, sv.rec.VolumeID)
		s.mu.Unlock()
		unlock()
	}
	return errors.Join(errs...)
}
