package quorum

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// ErrStandby is wrapped by the refusals of a standby engine: what it
// is asked to do would write to children it has not taken over.
var ErrStandby = errors.New("standby: not activated")

// ErrFenced is what a child's error wraps when the child refuses the
// engine because another engine (a newer attachment) took it over. That
// is no fault of the child: the engine has lost the volume. It faults
// no child and commits no record from then on, since a record would
// mark children out of sync only because the new holder fenced them
// one after the other, and the new holder reads the newest record. Every
// write-class request fails from then on, and so does the one that met
// the fence, even where enough children took it: one fenced child may
// hold an older version in an extent the new holder reconciles, so only
// a write that every child took is acknowledged.
var ErrFenced = errors.New("fenced: another attachment holds the volume")

// ErrActivation is wrapped by the errors of requests that failed
// because the standby engine could not take its children over.
var ErrActivation = errors.New("activation failed")

// Activation is what a standby engine learns about its children once
// they are its alone: the state the last holder left them in.
type Activation struct {
	// Dirty has one entry per child, in configured order: the regions
	// the child misses, nil for a child in sync. A child with a map is
	// left out of reads and resynced.
	Dirty []*Bitmap
	// Active are the extents of the last holder's write intent; Recover
	// reconciles them, as after a crash, since the last holder stopped
	// wherever it was.
	Active []int64
}

// Activator takes a standby engine's children over from their last
// holder, from which point that holder can write to none of them; it
// then reads the state the holder left and hands it to takeOver,
// exactly once, and returns takeOver's error. Every request waits
// meanwhile.
type Activator func(ctx context.Context, takeOver func(Activation) error) error

// standbyGate is how a standby engine becomes active. Reads run under a
// shared hold of mu so that an activation, which holds it exclusively,
// waits for them and they for it. A failed attempt fails the requests
// that waited for it; the next write-class request tries again, since
// what failed may have been a replica server in the middle of a restart.
type standbyGate struct {
	mu        sync.RWMutex
	attemptMu sync.Mutex
	attempt   *attempt
	activated chan struct{} // closed once active
}

type attempt struct {
	done chan struct{}
	err  error
}

// Standby reports whether the engine is a standby that has not been
// activated: it serves reads and has written nothing to its children.
func (e *Engine) Standby() bool { return !e.active.Load() }

// Activated is closed once the engine is active: at New for an engine
// without Config.Standby, else when an activation succeeded.
func (e *Engine) Activated() <-chan struct{} { return e.gate.activated }

// Activate takes the children of a standby engine over (Config.Standby)
// unless it is active already. Concurrent callers share one attempt:
// the caller that starts it runs it to its end, the others stop waiting
// when their ctx ends, and the attempt goes on.
func (e *Engine) Activate(ctx context.Context) error {
	if e.active.Load() {
		return nil
	}
	g := &e.gate
	g.attemptMu.Lock()
	if e.active.Load() {
		g.attemptMu.Unlock()
		return nil
	}
	a := g.attempt
	if a == nil {
		a = &attempt{done: make(chan struct{})}
		g.attempt = a
		g.attemptMu.Unlock()
		// The first request's cancellation must not abort a takeover
		// the others wait for; the children's own timeouts bound it.
		a.err = e.activate(context.WithoutCancel(ctx))
		g.attemptMu.Lock()
		g.attempt = nil
		g.attemptMu.Unlock()
		close(a.done)
		return a.err
	}
	g.attemptMu.Unlock()
	select {
	case <-a.done:
		return a.err
	case <-ctx.Done():
		return fmt.Errorf("wait for the standby's activation: %w", ctx.Err())
	}
}

func (e *Engine) activate(ctx context.Context) error {
	g := &e.gate
	g.mu.Lock()
	defer g.mu.Unlock()
	called := false
	err := e.cfg.Standby(ctx, func(a Activation) error {
		if called {
			return errors.New("the activator took the children over twice")
		}
		called = true
		return e.takeOver(a)
	})
	if err == nil && !called {
		err = errors.New("the activator returned without taking the children over")
	}
	if err != nil {
		return fmt.Errorf("%w: %w", ErrActivation, err)
	}
	e.active.Store(true)
	close(g.activated)
	for i := range e.children {
		e.StartResync(i)
	}
	return nil
}

// takeOver sets every child's state from a, as New does from the
// members' Dirty maps, and starts recovering the extents the last holder
// had in flight (Recover). It replaces whatever an earlier failed
// attempt left; nothing fails once recovery has started.
func (e *Engine) takeOver(a Activation) error {
	if len(a.Dirty) != len(e.children) {
		return fmt.Errorf("activation lists %d children, the engine has %d", len(a.Dirty), len(e.children))
	}
	inSync := 0
	for i, d := range a.Dirty {
		if d == nil {
			inSync++
		} else if d.RegionSize() != e.cfg.RegionSize || d.size != e.size {
			return fmt.Errorf("child %s: dirty map of another geometry", e.children[i].Name)
		}
	}
	if inSync == 0 {
		return errors.New("every child is out of sync: no source for a resync")
	}
	e.faultMu.Lock()
	e.dirtyMu.Lock()
	for i, m := range e.children {
		if m.unrecorded {
			m.unrecorded = false
			e.unrecorded.Add(-1)
		}
		m.dirty, m.cause = nil, nil
		state := stateHealthy
		if d := a.Dirty[i]; d != nil {
			m.dirty = d.Clone()
			m.cause = errors.New("out of sync at activation")
			state = stateFaulty
		}
		m.state.Store(state)
	}
	e.dirtyMu.Unlock()
	e.faultMu.Unlock()
	e.Recover(a.Active)
	return nil
}

// Fenced reports whether a child refused the engine because another
// attachment took the volume over.
func (e *Engine) Fenced() bool { return e.fenced.Load() }

// fencedFailure fails a request of a fenced engine.
func (e *Engine) fencedFailure(op Op, off, length int64) error {
	e.emit(Event{Type: EventQuorumFailure, Op: op, Offset: off, Length: length, Error: ErrFenced.Error()})
	return fmt.Errorf("%s at %d length %d: %w: %w", op, off, length, ErrFenced, ErrQuorumFailure)
}

// awaitActive lets a write-class request through once the engine is
// active, activating a standby first.
func (e *Engine) awaitActive(ctx context.Context, op Op) error {
	if e.active.Load() {
		return nil
	}
	if err := e.Activate(ctx); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return nil
}

// holdStandby makes a read of a standby wait for an activation in
// progress and keeps the next one from starting until it is done.
func (e *Engine) holdStandby() (release func()) {
	if e.active.Load() {
		return func() {}
	}
	e.gate.mu.RLock()
	return e.gate.mu.RUnlock
}
