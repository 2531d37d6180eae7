package volume

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quorum-csi/quorum-csi/pkg/attach"
	"github.com/quorum-csi/quorum-csi/pkg/metrics"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// AttachConfig is what an attached volume is made from: its replicas and
// engine settings, the frontend that turns it into a block device, and
// the background work that keeps it healthy.
type AttachConfig struct {
	// Replicas in fifo order (the local one first): image paths or NBD
	// URIs, as Open takes them.
	Replicas []string
	// Options are the engine settings. Options.OnEvent is called for
	// every engine event, after the metrics have counted it.
	Options Options
	// Frontend is a resolved frontend (attach.ResolveFrontend).
	Frontend string
	// StateDir holds the device's state file, FRONTEND-VOLUMEID, with
	// which a later process takes a device left by this one back (see
	// attach.Options.StateFile), the FUSE descriptor holders' sockets and
	// the private FUSE mount points. Empty: the device dies with the
	// process.
	StateDir string
	// HolderSocket is the FUSE descriptor holder this process puts its
	// FUSE connections into (attach.Options.HolderSocket).
	HolderSocket string
	// ProbeInterval is how often faulty replicas are asked whether they
	// answer again, which starts their resync (default 2s).
	ProbeInterval time.Duration
	// ScrubRate is the background scrub's bytes per second (0: no
	// background scrub); ScrubInterval the time between passes (default
	// 24h). The scrub is what finds silent corruption on fifo volumes.
	ScrubRate     int64
	ScrubInterval time.Duration
	// Metrics, if set, measures the volume: requests on its device,
	// engine events, replica states.
	Metrics *metrics.Set
	// Name labels the volume in its metrics and names its device's state
	// file (default: the volume id the replicas carry). The node's data
	// path uses the CSI volume id, which users know.
	Name string
	// Logger receives the volume's progress (default slog.Default()).
	Logger *slog.Logger
	// OnActivated, if set, is called once a standby (Options.Standby)
	// was activated, from a goroutine of the volume's that Detach waits
	// for: it must not wait for the caller of Detach.
	OnActivated func()
}

// Attached is a volume served as a block device: the one pipeline that
// quorumctl attach and the node's data path both run. It owns the
// engine, the device, the volume's metrics and its background probe and
// scrub, and takes them down together.
type Attached struct {
	*Volume
	Device attach.Device

	metrics *metrics.Volume // nil without AttachConfig.Metrics
	stop    context.CancelFunc
	loops   sync.WaitGroup
	log     *slog.Logger

	quiesceMu  sync.Mutex
	resume     func() // set while quiesced
	quiescedAt time.Time
	holdTimer  *time.Timer
}

// Attach assembles the replicas (recovering from a crash of the last
// attach first), makes the block device, or takes back the device a
// previous process served (see attach.Options.StateFile), and starts the
// probe and the scrub. Crash recovery runs in the background, and
// before any request to an extent it has not reached, so the requests
// the users of a device taken back had waiting see recovered data. A
// standby (cfg.Options.Standby) is served at once, for reads; its first
// write-class request takes the replicas over first, and its scrub
// starts after that.
func Attach(ctx context.Context, cfg AttachConfig) (_ *Attached, err error) {
	a := &Attached{log: cmp.Or(cfg.Logger, slog.Default())}
	// Events reach the metrics once they exist, after Open.
	var volMetrics atomic.Pointer[metrics.Volume]
	onEvent := cfg.Options.OnEvent
	cfg.Options.OnEvent = func(e quorum.Event) {
		if m := volMetrics.Load(); m != nil {
			m.Event(e)
		}
		if onEvent != nil {
			onEvent(e)
		}
	}
	if cfg.Options.Logger == nil {
		cfg.Options.Logger = a.log
	}
	if a.Volume, err = Open(ctx, cfg.Replicas, cfg.Options); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			a.forgetMetrics()
			err = errors.Join(err, a.Volume.Close(context.WithoutCancel(ctx)))
		}
	}()
	if cfg.Options.Standby {
		a.log.Info("standby: serving reads; the first write, discard or write-zeroes takes the replicas over", "epoch", cfg.Options.Epoch)
	} else {
		a.logActivation()
	}
	name := cmp.Or(cfg.Name, a.ID())
	var served attach.Volume = a.Engine
	if cfg.Metrics != nil {
		a.metrics = cfg.Metrics.AddVolume(name, a.Status)
		volMetrics.Store(a.metrics)
		served = a.metrics.Instrument(a.Engine)
	}
	dev := attach.Options{
		BlockSize: a.BlockSize(),
		StateDir:  cfg.StateDir,
		Logf:      func(f string, args ...any) { a.log.Info(fmt.Sprintf(f, args...), "volume", name) },
	}
	if cfg.StateDir != "" {
		dev.StateFile = DeviceStateFile(cfg.StateDir, cfg.Frontend, name)
		dev.HolderDir = cfg.StateDir
		dev.HolderSocket = cfg.HolderSocket
	}
	a.Device, err = attach.Attach(ctx, cfg.Frontend, served, dev)
	if err != nil {
		return nil, fmt.Errorf("attach volume %s (%s): %w", name, cfg.Frontend, err)
	}
	bg, stop := context.WithCancel(context.Background())
	a.stop = stop
	a.loops.Add(1)
	go func() {
		defer a.loops.Done()
		a.ProbeEvery(bg, cmp.Or(cfg.ProbeInterval, 2*time.Second))
	}()
	a.loops.Add(1)
	go func() {
		defer a.loops.Done()
		select {
		case <-a.Activated():
		case <-bg.Done():
			return
		}
		if cfg.Options.Standby {
			a.log.Info("standby activated: the replicas are this attach's, the previous holder is fenced", "epoch", cfg.Options.Epoch, "took", a.ActivatedIn.String())
			a.logActivation()
			if cfg.OnActivated != nil {
				cfg.OnActivated()
			}
		}
		if len(a.Unclean) > 0 {
			a.loops.Add(1)
			go func() {
				defer a.loops.Done()
				a.reportRecovery(bg, name)
			}()
		}
		// A standby's scrub would repair replicas another attach holds.
		if cfg.ScrubRate > 0 {
			a.ScrubEvery(bg, cfg.ScrubRate, cmp.Or(cfg.ScrubInterval, 24*time.Hour))
		}
	}()
	return a, nil
}

// logActivation reports what taking the replicas over found.
func (a *Attached) logActivation() {
	if len(a.Unclean) > 0 {
		a.log.Warn("the last attach did not detach cleanly; recovering the extents it had in flight, in the background and before any request to one of them", "replicas", a.Unclean)
	}
	for _, p := range a.Stale {
		a.log.Warn("replica missed writes; resyncing it in the background", "replica", p)
	}
}

// DeviceStateFile is where the device of volume id, made by frontend, keeps
// what a successor needs to take it back.
func DeviceStateFile(stateDir, frontend, id string) string {
	return filepath.Join(stateDir, frontend+"-"+id)
}

// stopLoops ends the probe and the scrub and waits for them.
func (a *Attached) stopLoops() {
	a.stop()
	a.loops.Wait()
}

func (a *Attached) forgetMetrics() {
	if a.metrics != nil {
		a.metrics.Remove()
		a.metrics = nil
	}
}

// Detach removes the device once nobody uses it (waiting until ctx
// ends; then it stays attached and served, and the error wraps
// attach.ErrBusy), then closes the volume, which marks the replicas
// clean.
func (a *Attached) Detach(ctx context.Context) error {
	// Held requests would keep the device busy for good.
	a.Resume()
	if err := a.Device.Detach(ctx); err != nil {
		return err
	}
	return a.shutDown(ctx)
}

// shutDown ends what the device no longer needs once it stopped serving.
func (a *Attached) shutDown(ctx context.Context) error {
	id := a.ID()
	a.stopLoops()
	a.forgetMetrics()
	if err := a.Volume.Close(context.WithoutCancel(ctx)); err != nil {
		return fmt.Errorf("close volume %s: %w", id, err)
	}
	return nil
}

// ForceDetach removes the device even while it is in use (its users get
// I/O errors) and closes the volume.
func (a *Attached) ForceDetach() error {
	a.Resume()
	return errors.Join(a.Device.ForceDetach(), a.shutDown(context.Background()))
}

// Release hands the device over: it stops serving (requests in flight
// are answered, new ones wait in the kernel), closes the volume cleanly
// and leaves the device for the next Attach with the same state file.
func (a *Attached) Release(ctx context.Context) error {
	// Requests held by a quiesce are in flight for the device: answered
	// before it lets go.
	a.Resume()
	if err := a.Device.Release(ctx); err != nil {
		return fmt.Errorf("release %s of volume %s: %w", a.Device.Path(), a.ID(), err)
	}
	return a.shutDown(ctx)
}

// ErrNotQuiesced is returned by Resume for a volume that is not held.
var ErrNotQuiesced = errors.New("volume is not quiesced")

// Quiesce holds the volume at a consistent cut (quorum.Engine.Quiesce):
// its device's requests wait from now on, every in-sync replica holds
// every acknowledged write, and the journal says none is in flight, so
// a copy of each replica's image is a snapshot. The hold ends with Resume
// or, failing that, after maxHold, so a caller that dies never leaves the
// volume's users waiting for good.
func (a *Attached) Quiesce(ctx context.Context, maxHold time.Duration) error {
	a.quiesceMu.Lock()
	defer a.quiesceMu.Unlock()
	if a.resume != nil {
		return errors.New("volume is already quiesced")
	}
	resume, err := a.Engine.Quiesce(ctx)
	if err != nil {
		return err
	}
	a.resume = resume
	a.quiescedAt = time.Now()
	a.holdTimer = time.AfterFunc(maxHold, func() {
		if a.Resume() == nil {
			a.log.Warn("resumed a quiesced volume that nobody resumed", "held", maxHold.String())
		}
	})
	return nil
}

// Resume lets the requests of a quiesced volume through again and
// reports how long they were held.
func (a *Attached) Resume() error {
	a.quiesceMu.Lock()
	defer a.quiesceMu.Unlock()
	if a.resume == nil {
		return ErrNotQuiesced
	}
	a.holdTimer.Stop()
	a.resume()
	a.resume = nil
	a.log.Info("resumed", "held", time.Since(a.quiescedAt).String())
	return nil
}

// Quiesced reports whether the volume's requests are held.
func (a *Attached) Quiesced() bool {
	a.quiesceMu.Lock()
	defer a.quiesceMu.Unlock()
	return a.resume != nil
}

// reportRecovery logs the end of the crash recovery the activation
// started.
func (a *Attached) reportRecovery(ctx context.Context, name string) {
	start := time.Now()
	st, err := a.Recovered(ctx)
	switch {
	case ctx.Err() != nil:
	case err != nil:
		a.log.Error("crash recovery stopped; requests recover the extents they touch, the next attach the rest", "volume", name, "error", err)
	default:
		a.log.Info("crash recovery done", "volume", name, "extents", st.Extents, "comparedBytes", st.Compared, "repairedBytes", st.Repaired, "took", time.Since(start).String())
	}
}
