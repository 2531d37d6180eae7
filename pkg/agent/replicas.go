package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"

	"github.com/go-logr/logr"

	"github.com/quorum-csi/quorum-csi/pkg/nbd"
	"github.com/quorum-csi/quorum-csi/pkg/replica"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// imageSuffix ends every replica image the agent makes.
const imageSuffix = ".img"

// exportServer is the part of the NBD server the agent changes while it
// runs.
type exportServer interface {
	AddExport(nbd.Export) error
	RemoveExport(name string) error
}

// replicaSet is the replicas a node serves: at most one per volume,
// since every export is named after its volume.
type replicaSet struct {
	dir string
	srv exportServer
	m   *metrics
	log logr.Logger

	mu     sync.Mutex
	served map[string]*served // by volume name
}

// served is a replica being served.
type served struct {
	uid, replica, path string
	size               int64
	file               *replica.File
	backends           []*backend
	closeExtents       func() error
	// unconfirmed: served from disk at start (serveOnDisk), and no
	// QuorumVolume has placed it here since.
	unconfirmed bool
}

// errNotOurs refuses to delete an image that cannot be attributed to the
// replica being deleted.
var errNotOurs = errors.New("not deleted: the image is not this replica's")

// replicaPath is where a volume's replica lives:
// DATA/<volume>/<replica>.img, with .qmeta, .qjournal and .qepoch beside.
func (s *replicaSet) replicaPath(vol, rep string) string {
	return filepath.Join(s.dir, vol, rep+imageSuffix)
}

// lookup returns what is served for a volume.
func (s *replicaSet) lookup(vol string) (served, bool) { return s.confirm(vol, "", "") }

// confirm is lookup that also marks the replica served from disk as
// placed when it is replica rep of the volume with uid (never for an
// empty uid: an image always has one).
func (s *replicaSet) confirm(vol, uid, rep string) (served, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sv, ok := s.served[vol]
	if !ok {
		return served{}, false
	}
	if uid != "" && sv.uid == uid && sv.replica == rep {
		sv.unconfirmed = false
	}
	return *sv, true
}

// stopUnconfirmed stops serving the volume's replica if it was served
// from disk at start and nothing placed it since.
func (s *replicaSet) stopUnconfirmed(vol string) (bool, error) {
	s.mu.Lock()
	sv, ok := s.served[vol]
	if !ok || !sv.unconfirmed {
		s.mu.Unlock()
		return false, nil
	}
	delete(s.served, vol)
	s.m.served.Set(float64(len(s.served)))
	s.mu.Unlock()
	return true, s.release(vol, sv)
}

// ensure makes sure replica rep of the volume (name vol, uid) exists with
// size bytes and is served. It creates a missing image, reuses one with
// the right ids (an agent restart), grows a smaller one, and refuses, never
// overwriting, an image that belongs to another volume or replica.
func (s *replicaSet) ensure(vol, uid, rep string, size int64) error {
	if cur, ok := s.confirm(vol, uid, rep); ok {
		if cur.uid != uid || cur.replica != rep {
			return fmt.Errorf("node already serves replica %s of volume %s (uid %s) as export %q; one replica per volume and node", cur.replica, vol, cur.uid, vol)
		}
		if cur.size == size {
			return nil
		}
		// Growing needs the replica closed: its size is fixed while it
		// is open and exported. Connections are ended; clients reconnect
		// once it is served again.
		if err := s.stop(vol); err != nil {
			return err
		}
	}
	path := s.replicaPath(vol, rep)
	m, err := replica.ReadMeta(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return fmt.Errorf("create replica %s: %w", path, err)
		}
		if err := replica.CreateWithID(path, size, uid, rep); err != nil {
			return err
		}
		s.log.Info("created replica", "volume", vol, "replica", rep, "path", path, "size", size)
	case err != nil:
		return fmt.Errorf("%w; left as it is", err)
	case m.VolumeID != uid || m.ReplicaID != rep:
		return fmt.Errorf("replica %s: holds replica %s of volume %s, not replica %s of this volume (uid %s); left as it is", path, m.ReplicaID, m.VolumeID, rep, uid)
	case m.Size > size:
		return fmt.Errorf("replica %s: has %d bytes, more than spec.size %d; replicas never shrink", path, m.Size, size)
	case m.Size < size:
		if err := volume.GrowReplica(path, size); err != nil {
			return err
		}
		s.log.Info("grew replica", "volume", vol, "replica", rep, "path", path, "from", m.Size, "to", size)
	}
	return s.serve(vol, uid, rep, path)
}

// serve opens the replica and adds its two exports (volume.ReplicaExports).
func (s *replicaSet) serve(vol, uid, rep, path string) (err error) {
	f, err := replica.Open(path)
	if err != nil {
		return err
	}
	sv := &served{uid: uid, replica: rep, path: path, size: f.Size(), file: f}
	defer func() {
		if err != nil {
			s.release(vol, sv)
		}
	}()
	xs, closeExtents, err := volume.ReplicaExports(f, vol, false)
	if err != nil {
		return fmt.Errorf("serve replica %s: %w", path, err)
	}
	sv.closeExtents = closeExtents
	for i, x := range xs {
		b := &backend{Backend: x.Backend, volume: vol, export: x.Name}
		if i == 0 {
			b.m = s.m
		}
		x.Backend = b
		if err := s.srv.AddExport(x); err != nil {
			return fmt.Errorf("serve replica %s: %w", path, err)
		}
		sv.backends = append(sv.backends, b)
	}
	s.mu.Lock()
	s.served[vol] = sv
	s.m.served.Set(float64(len(s.served)))
	s.mu.Unlock()
	s.m.track(vol)
	s.log.Info("serving replica", "volume", vol, "replica", rep, "path", path, "size", sv.size)
	return nil
}

// stop stops serving a volume's replica and closes it; requests in flight
// finish first. Nothing on disk changes.
func (s *replicaSet) stop(vol string) error {
	s.mu.Lock()
	sv, ok := s.served[vol]
	delete(s.served, vol)
	s.m.served.Set(float64(len(s.served)))
	s.mu.Unlock()
	if !ok {
		return nil
	}
	return s.release(vol, sv)
}

// release removes what serve added, in reverse.
func (s *replicaSet) release(vol string, sv *served) error {
	var errs []error
	for _, b := range sv.backends {
		if err := s.srv.RemoveExport(b.export); err != nil {
			errs = append(errs, err)
		}
		b.drain()
	}
	if sv.closeExtents != nil {
		errs = append(errs, sv.closeExtents())
	}
	errs = append(errs, sv.file.Close())
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("stop serving replica %s: %w", sv.path, err)
	}
	return nil
}

// stopAll stops serving every replica, at shutdown.
func (s *replicaSet) stopAll() error {
	s.mu.Lock()
	vols := make([]string, 0, len(s.served))
	for v := range s.served {
		vols = append(vols, v)
	}
	s.mu.Unlock()
	var errs []error
	for _, v := range vols {
		errs = append(errs, s.stop(v))
	}
	return errors.Join(errs...)
}

// remove stops serving replica rep of volume vol (uid) if it is served,
// and deletes its files; a missing file is already deleted. An image
// whose metadata names another volume or replica, or cannot be read, is
// not this replica's and is left alone (ErrNotOurs). The volume's folder
// goes when it is empty.
func (s *replicaSet) remove(vol, uid, rep string) error {
	if cur, ok := s.lookup(vol); ok && cur.replica == rep {
		if err := s.stop(vol); err != nil {
			return err
		}
	}
	path := s.replicaPath(vol, rep)
	m, err := replica.ReadMeta(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// The image is gone; what may be left beside it is ours to clean.
	case err != nil:
		return fmt.Errorf("%w: %w", errNotOurs, err)
	case m.VolumeID != uid || m.ReplicaID != rep:
		return fmt.Errorf("%w: %s holds replica %s of volume %s", errNotOurs, path, m.ReplicaID, m.VolumeID)
	}
	var errs []error
	for _, f := range []string{path, replica.MetaPath(path), replica.JournalPath(path), replica.EpochPath(path)} {
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("delete replica %s: %w", path, err)
	}
	if err := os.Remove(filepath.Dir(path)); err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTEMPTY) {
		return fmt.Errorf("delete replica %s: folder: %w", path, err)
	}
	s.m.forget(vol)
	s.log.Info("deleted replica", "volume", vol, "replica", rep, "path", path)
	return nil
}

// onDisk lists the replica names that have an image under a volume's
// folder, sorted.
func (s *replicaSet) onDisk(vol string) ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(s.dir, vol))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list replicas of %s: %w", vol, err)
	}
	var reps []string
	for _, e := range ents {
		if name, ok := strings.CutSuffix(e.Name(), imageSuffix); ok && e.Type().IsRegular() {
			reps = append(reps, name)
		}
	}
	slices.Sort(reps)
	return reps, nil
}

// serveOnDisk serves, before the agent reaches the API server, every
// replica its data folder holds (one image per volume folder, with
// readable metadata): an agent that restarts, in a rolling upgrade
// above all, then answers its clients as soon as it listens instead of
// after its first reconcile, which can take seconds. The reconciler
// then finds them served; logOrphans stops serving the ones no
// QuorumVolume places here.
func (s *replicaSet) serveOnDisk() {
	vols, err := s.volumesOnDisk()
	if err != nil {
		s.log.Error(err, "serve the replicas on disk at start")
		return
	}
	for _, vol := range vols {
		reps, err := s.onDisk(vol)
		if err != nil || len(reps) != 1 {
			// Left to the reconciler, which knows which one is placed.
			continue
		}
		path := s.replicaPath(vol, reps[0])
		m, err := replica.ReadMeta(path)
		if err != nil || m.ReplicaID != reps[0] {
			s.log.Info("replica image not served at start: its metadata does not name it", "path", path, "error", err)
			continue
		}
		if err := s.serve(vol, m.VolumeID, reps[0], path); err != nil {
			s.log.Error(err, "serve a replica on disk at start", "path", path)
			continue
		}
		s.mu.Lock()
		s.served[vol].unconfirmed = true
		s.mu.Unlock()
	}
}

// volumesOnDisk lists the volume folders under the data folder.
func (s *replicaSet) volumesOnDisk() ([]string, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list data folder: %w", err)
	}
	var vols []string
	for _, e := range ents {
		if e.IsDir() {
			vols = append(vols, e.Name())
		}
	}
	return vols, nil
}
