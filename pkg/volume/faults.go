package volume

import (
	"context"
	"errors"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

// faultyWhile fails every request to a replica with EIO while a control
// file exists, like nbdkit's error filter with error-file: a way to make
// one replica of a running volume fail, and recover, from outside.
type faultyWhile struct {
	quorum.Child
	on atomic.Bool
}

// watchFaults starts polling control every interval until ctx ends.
func watchFaults(ctx context.Context, c quorum.Child, control string, interval time.Duration) *faultyWhile {
	f := &faultyWhile{Child: c}
	check := func() {
		_, err := os.Stat(control)
		f.on.Store(err == nil)
	}
	check()
	go every(ctx, interval, check)
	return f
}

var errInjected = errors.Join(errors.New("injected fault"), syscall.EIO)

func (f *faultyWhile) fail() error {
	if f.on.Load() {
		return errInjected
	}
	return nil
}

func (f *faultyWhile) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := f.fail(); err != nil {
		return err
	}
	return f.Child.ReadAt(ctx, p, off)
}

func (f *faultyWhile) WriteAt(ctx context.Context, p []byte, off int64) error {
	if err := f.fail(); err != nil {
		return err
	}
	return f.Child.WriteAt(ctx, p, off)
}

func (f *faultyWhile) Flush(ctx context.Context) error {
	if err := f.fail(); err != nil {
		return err
	}
	return f.Child.Flush(ctx)
}

func (f *faultyWhile) Discard(ctx context.Context, off, length int64) error {
	if err := f.fail(); err != nil {
		return err
	}
	return f.Child.Discard(ctx, off, length)
}

func (f *faultyWhile) WriteZeroes(ctx context.Context, off, length int64) error {
	if err := f.fail(); err != nil {
		return err
	}
	return f.Child.WriteZeroes(ctx, off, length)
}
