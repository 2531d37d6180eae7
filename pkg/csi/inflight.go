package csi

import (
	"fmt"
	"sync"
)

// inflight admits one call per volume at a time. The CO retries calls
// whose deadline passed while the first one still runs; answering the
// retry with ABORTED (as the CSI spec asks for "an operation pending for
// the volume") keeps two calls from racing through the same steps, e.g.
// a delete between a create's Create and its Get.
type inflight struct {
	mu   sync.Mutex
	busy map[string]string // volume ID -> the method holding it
}

// acquire marks volume busy for method and returns its release, or an
// error wrapping errAborted naming the call in flight.
func (f *inflight) acquire(volume, method string) (release func(), err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if held, ok := f.busy[volume]; ok {
		return nil, fmt.Errorf("%w: %s of volume %s is in flight", errAborted, held, volume)
	}
	if f.busy == nil {
		f.busy = map[string]string{}
	}
	f.busy[volume] = method
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		delete(f.busy, volume)
	}, nil
}

// begin starts a call that changes a volume, in the order every such call
// follows: the request's required fields (INVALID_ARGUMENT), then the
// volume taken for method (ABORTED while another call holds it).
func (f *inflight) begin(volume, method string, args ...arg) (release func(), err error) {
	if err := required(args...); err != nil {
		return nil, err
	}
	return f.acquire(volume, method)
}
