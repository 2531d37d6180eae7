package quorum

import (
	"container/list"
	"context"
	"sync"
)

// rangeTable orders overlapping requests by submission. A request waits
// for every earlier request it conflicts with (overlapping, and at least
// one of the two modifies data); there are no other waits, so requests on
// disjoint ranges never delay each other, and waits only point to earlier
// requests, so there is no deadlock.
type rangeTable struct {
	mu     sync.Mutex
	active list.List // of *rangeReq, in submission order
}

type rangeReq struct {
	off, end int64
	modify   bool
	done     chan struct{}
	elem     *list.Element
}

func (r *rangeReq) conflicts(o *rangeReq) bool {
	return r.off < o.end && o.off < r.end && (r.modify || o.modify)
}

// acquire registers [off, end) and waits for the earlier requests it
// conflicts with. On error (context ended) nothing is held.
func (t *rangeTable) acquire(ctx context.Context, off, end int64, modify bool) (*rangeReq, error) {
	r := &rangeReq{off: off, end: end, modify: modify, done: make(chan struct{})}
	var waits []chan struct{}
	t.mu.Lock()
	for e := t.active.Front(); e != nil; e = e.Next() {
		if o := e.Value.(*rangeReq); r.conflicts(o) {
			waits = append(waits, o.done)
		}
	}
	r.elem = t.active.PushBack(r)
	t.mu.Unlock()
	for _, w := range waits {
		select {
		case <-w:
		case <-ctx.Done():
			t.release(r)
			return nil, ctx.Err()
		}
	}
	return r, nil
}

func (t *rangeTable) release(r *rangeReq) {
	t.mu.Lock()
	t.active.Remove(r.elem)
	t.mu.Unlock()
	close(r.done)
}
