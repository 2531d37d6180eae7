package csi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/attach"
	"github.com/quorum-csi/quorum-csi/pkg/controller"
	"github.com/quorum-csi/quorum-csi/pkg/metrics"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
	"github.com/quorum-csi/quorum-csi/pkg/volume"
)

// Frontends of NodeConfig.Frontend: how an assembled volume becomes a
// block device (package attach).
const (
	FrontendAuto     = attach.FrontendAuto
	FrontendUblk     = attach.FrontendUblk
	FrontendFUSELoop = attach.FrontendFUSELoop
)

const (
	// defaultFSType is made on a Filesystem volume whose volume context
	// names none.
	defaultFSType = "ext4"
	// deviceFile, in a Block volume's staging folder, names the device
	// NodePublishVolume binds, so that a restarted plugin still knows it.
	deviceFile = "quorum-device"
	// detachTimeout bounds NodeUnstageVolume's wait for the device's last
	// user (e.g. a filesystem still being unmounted by another process).
	detachTimeout = 30 * time.Second
	// probeInterval is how often faulty replicas of a staged volume are
	// asked whether they answer again, which starts their resync.
	probeInterval = 2 * time.Second
	// pollInterval paces NodeStageVolume's wait for Healthy replicas.
	pollInterval = 500 * time.Millisecond
)

// NodeConfig is what the Node service needs from the node binary.
type NodeConfig struct {
	// NodeName is the Kubernetes Node name: the node ID, and how the
	// node finds its own replica in a QuorumVolume's status.
	NodeName string
	// Client reads QuorumVolumes from the API server (not a cache: a
	// stage needs the replicas' current endpoints).
	Client client.Reader
	// TLSDir holds the NBD client certificates (ca-cert.pem,
	// client-cert.pem, client-key.pem) for every replica server.
	TLSDir string
	// LocalSocket is the node agent's Unix socket (agent.Config's
	// LocalSocket); the local replica is reached through it, so that its
	// writes are epoch-fenced like remote ones.
	LocalSocket string
	// TLSHostname is a name in the agent's server certificate, checked
	// on the local socket where there is no host to check.
	TLSHostname string
	// StateDir holds each staged volume's FUSE mount point and ublk
	// state file, StateDir/<volume>.
	StateDir string
	// Frontend is FrontendAuto (default), FrontendUblk or
	// FrontendFUSELoop.
	Frontend string
	// RequestTimeout bounds each request to a replica server, the wait
	// for a reconnect included (the engine's default when zero).
	RequestTimeout time.Duration
	// Logger receives the engine's and NBD clients' logs.
	Logger *slog.Logger
	// Events, if set, records the engine's QUORUM_FAILURE and REPORT_BAD
	// events as Warning Events on the QuorumVolume.
	Events client.Client
	// Metrics, if set, measures each staged volume: requests, bytes and
	// latency on its device, engine events, replica states and resync
	// progress.
	Metrics *metrics.Set
}

// Node is the CSI Node service: it assembles a volume's replicas into a
// block device on this node (NodeStageVolume), mounts it where the CO
// asks (NodePublishVolume), and takes it apart again.
type Node struct {
	csipb.UnimplementedNodeServer
	cfg     NodeConfig
	mounter *mount.SafeFormatAndMount
	locks   inflight

	mu     sync.Mutex
	staged map[string]*stagedVolume // by volume ID
}

// stagedVolume is a volume assembled on this node.
type stagedVolume struct {
	stagingPath string
	block       bool
	vol         *volume.Volume
	dev         attach.Device
	stopProbe   context.CancelFunc
	metrics     *metrics.Volume // nil without NodeConfig.Metrics
	// targets are the paths the volume is published at, with whether
	// that publish asked for SINGLE_NODE_SINGLE_WRITER, which allows no
	// second one.
	targets map[string]bool
}

// NewNode returns the Node service. It mounts with the host's mount and
// mkfs tools.
func NewNode(cfg NodeConfig) (*Node, error) {
	if cfg.NodeName == "" || cfg.Client == nil || cfg.StateDir == "" || cfg.LocalSocket == "" || cfg.TLSDir == "" {
		return nil, errors.New("CSI node: node name, client, state folder, local socket and TLS folder are required")
	}
	var err error
	if cfg.Frontend, err = attach.ResolveFrontend(cfg.Frontend); err != nil {
		return nil, fmt.Errorf("CSI node: %w", err)
	}
	if cfg.TLSHostname == "" {
		cfg.TLSHostname = "localhost"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Node{
		cfg:     cfg,
		mounter: mount.NewSafeFormatAndMount(mount.New(""), utilexec.New()),
		staged:  map[string]*stagedVolume{},
	}, nil
}

// Frontend is the frontend staged volumes are attached with.
func (s *Node) Frontend() string { return s.cfg.Frontend }

func (s *Node) NodeGetInfo(context.Context, *csipb.NodeGetInfoRequest) (*csipb.NodeGetInfoResponse, error) {
	return &csipb.NodeGetInfoResponse{
		NodeId:             s.cfg.NodeName,
		AccessibleTopology: &csipb.Topology{Segments: map[string]string{TopologyKeyNode: s.cfg.NodeName}},
	}, nil
}

// NodeGetCapabilities: staging (the device is assembled once per node),
// volume stats, expansion (of the filesystem; see NodeExpandVolume) and
// SINGLE_NODE_MULTI_WRITER, and volume health (CSI v1.13's successor of
// VOLUME_CONDITION): what the engine on this node sees of the replicas,
// which can be newer than the controller's view.
func (*Node) NodeGetCapabilities(context.Context, *csipb.NodeGetCapabilitiesRequest) (*csipb.NodeGetCapabilitiesResponse, error) {
	rpc := func(t csipb.NodeServiceCapability_RPC_Type) *csipb.NodeServiceCapability {
		return &csipb.NodeServiceCapability{Type: &csipb.NodeServiceCapability_Rpc{Rpc: &csipb.NodeServiceCapability_RPC{Type: t}}}
	}
	return &csipb.NodeGetCapabilitiesResponse{Capabilities: []*csipb.NodeServiceCapability{
		rpc(csipb.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME),
		rpc(csipb.NodeServiceCapability_RPC_GET_VOLUME_STATS),
		rpc(csipb.NodeServiceCapability_RPC_EXPAND_VOLUME),
		rpc(csipb.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER),
		rpc(csipb.NodeServiceCapability_RPC_GET_VOLUME_HEALTH),
	}}, nil
}

// NodeGetVolumeHealth reports the staged volume's replicas as the engine
// sees them: DEGRADED while some replica is faulty or resyncing but
// writes still reach the vote threshold, INACCESSIBLE when fewer
// replicas are healthy than the threshold; the message says replica by
// replica what is wrong.
func (s *Node) NodeGetVolumeHealth(ctx context.Context, req *csipb.NodeGetVolumeHealthRequest) (*csipb.NodeGetVolumeHealthResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, fmt.Errorf("%w: volume_id missing", errInvalidArgument)
	}
	sv := s.lookup(id)
	if sv == nil {
		return nil, fmt.Errorf("volume %s is not staged on this node: %w", id, errNotFound)
	}
	h := &csipb.VolumeHealth{VolumeId: id}
	var bad []string
	healthy := 0
	for _, c := range sv.vol.Status() {
		switch c.State {
		case quorum.ChildHealthy:
			healthy++
		case quorum.ChildResyncing:
			bad = append(bad, fmt.Sprintf("replica %s resyncing, %d of %d bytes copied", c.Name, c.ResyncDone, c.ResyncTotal))
		default:
			bad = append(bad, fmt.Sprintf("replica %s %s, %d bytes out of sync: %s", c.Name, c.State, c.DirtyBytes, c.Error))
		}
	}
	switch {
	case healthy < sv.vol.VoteThreshold():
		h.HealthStatuses = []*csipb.VolumeHealth_VolumeHealthEntry{{
			Status: csipb.VolumeHealthErrorType_INACCESSIBLE, Reason: "BelowVoteThreshold",
			Message: fmt.Sprintf("%d healthy replicas, vote threshold %d: %s", healthy, sv.vol.VoteThreshold(), strings.Join(bad, "; ")),
		}}
	case len(bad) > 0:
		h.HealthStatuses = []*csipb.VolumeHealth_VolumeHealthEntry{{
			Status: csipb.VolumeHealthErrorType_DEGRADED, Reason: "ReplicasNotHealthy", Message: strings.Join(bad, "; "),
		}}
	}
	return &csipb.NodeGetVolumeHealthResponse{VolumeHealth: h}, nil
}

// NodeStageVolume assembles the volume from its replicas with the
// attachment's epoch, attaches it as a block device and, for Filesystem
// access, makes a filesystem on a new volume and mounts it at the
// staging path. It waits, within the call's deadline, until enough
// replicas are Healthy to take writes.
func (s *Node) NodeStageVolume(ctx context.Context, req *csipb.NodeStageVolumeRequest) (*csipb.NodeStageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	switch {
	case id == "":
		return nil, fmt.Errorf("%w: volume_id missing", errInvalidArgument)
	case staging == "":
		return nil, fmt.Errorf("%w: staging_target_path missing", errInvalidArgument)
	case req.GetVolumeCapability() == nil:
		return nil, fmt.Errorf("%w: volume_capability missing", errInvalidArgument)
	}
	fsType := req.GetVolumeContext()[VolumeContextFSType]
	if err := checkCapability(req.GetVolumeCapability(), fsType); err != nil {
		return nil, fmt.Errorf("volume_capability: %w", err)
	}
	block := isBlock(req.GetVolumeCapability())
	if fs := req.GetVolumeCapability().GetMount().GetFsType(); fs != "" {
		fsType = fs
	}
	if fsType == "" {
		fsType = defaultFSType
	}
	release, err := s.locks.acquire(id, "NodeStageVolume")
	if err != nil {
		return nil, err
	}
	defer release()

	if sv := s.lookup(id); sv != nil {
		if sv.stagingPath != staging || sv.block != block {
			return nil, fmt.Errorf("%w: volume %s is already staged at %s (block %t)", errAlreadyExists, id, sv.stagingPath, sv.block)
		}
		return &csipb.NodeStageVolumeResponse{}, nil
	}
	epochText, ok := req.GetPublishContext()[PublishContextEpoch]
	if !ok {
		return nil, fmt.Errorf("%w: publish_context[%s] missing: was the volume published to this node?", errInvalidArgument, PublishContextEpoch)
	}
	epoch, err := strconv.ParseUint(epochText, 10, 64)
	if err != nil || epoch == 0 {
		return nil, fmt.Errorf("%w: publish_context[%s]=%q: want a positive integer", errInvalidArgument, PublishContextEpoch, epochText)
	}
	qv, err := s.waitReplicas(ctx, id)
	if err != nil {
		return nil, err
	}
	pattern, err := quorum.ParseReadPattern(string(qv.Spec.ReadPattern))
	if err != nil {
		return nil, fmt.Errorf("volume %s: readPattern: %w", id, err)
	}
	sv := &stagedVolume{stagingPath: staging, block: block, targets: map[string]bool{}}
	// The engine and the device outlive this call: they are detached by
	// NodeUnstageVolume, not when the CO's call ends.
	bg := context.WithoutCancel(ctx)
	// Events reach the metrics once they exist (after Open).
	var volMetrics atomic.Pointer[metrics.Volume]
	toKubernetes := s.eventSink(qv)
	sv.vol, err = volume.Open(bg, s.replicaURIs(qv), volume.Options{
		VoteThreshold:    int(qv.Spec.EffectiveVoteThreshold()),
		ReadPattern:      pattern,
		RewriteCorrupted: qv.Spec.RewriteCorrupted,
		Epoch:            epoch,
		RequestTimeout:   s.cfg.RequestTimeout,
		Logger:           s.cfg.Logger.With("volume", id),
		OnEvent: func(e quorum.Event) {
			if toKubernetes != nil {
				toKubernetes(e)
			}
			if m := volMetrics.Load(); m != nil {
				m.Event(e)
			}
		},
	})
	if err != nil {
		return nil, fmt.Errorf("assemble volume %s with epoch %d: %w", id, epoch, err)
	}
	var served attach.Volume = sv.vol.Engine
	if s.cfg.Metrics != nil {
		sv.metrics = s.cfg.Metrics.AddVolume(id, sv.vol.Status)
		volMetrics.Store(sv.metrics)
		served = sv.metrics.Instrument(sv.vol.Engine)
	}
	if err := s.attach(bg, id, sv, served); err != nil {
		sv.forgetMetrics()
		return nil, errors.Join(err, sv.vol.Close(bg))
	}
	if err := s.stageDevice(sv, fsType, req.GetVolumeCapability().GetMount().GetMountFlags()); err != nil {
		sv.forgetMetrics()
		return nil, errors.Join(fmt.Errorf("stage volume %s: %w", id, err), sv.dev.ForceDetach(), sv.vol.Close(bg))
	}
	probeCtx, stop := context.WithCancel(bg)
	sv.stopProbe = stop
	go sv.vol.ProbeEvery(probeCtx, probeInterval)
	s.mu.Lock()
	s.staged[id] = sv
	s.mu.Unlock()
	logr.FromContextOrDiscard(ctx).Info("staged", "device", sv.dev.Path(), "epoch", epoch, "frontend", s.cfg.Frontend, "block", block)
	return &csipb.NodeStageVolumeResponse{}, nil
}

// waitReplicas returns the volume once at least its voteThreshold
// replicas are Healthy with an endpoint: fewer could not take a write.
// A volume that is not ready when ctx ends fails the call retryably.
func (s *Node) waitReplicas(ctx context.Context, id string) (*v1alpha1.QuorumVolume, error) {
	var qv *v1alpha1.QuorumVolume
	healthy := 0
	err := wait.PollUntilContextCancel(ctx, pollInterval, true, func(ctx context.Context) (bool, error) {
		qv = &v1alpha1.QuorumVolume{}
		if err := s.cfg.Client.Get(ctx, client.ObjectKey{Name: id}, qv); err != nil {
			return false, fmt.Errorf("get QuorumVolume %s: %w", id, err)
		}
		healthy = 0
		for _, r := range qv.Status.Replicas {
			if r.State == v1alpha1.ReplicaHealthy && r.Endpoint != "" {
				healthy++
			}
		}
		return healthy >= int(qv.Spec.EffectiveVoteThreshold()), nil
	})
	if err != nil {
		if qv != nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)) {
			return nil, fmt.Errorf("volume %s: %d of the %d Healthy replicas a write needs: %w", id, healthy, qv.Spec.EffectiveVoteThreshold(), err)
		}
		return nil, err
	}
	return qv, nil
}

// replicaURIs lists the replicas to assemble in fifo order: this node's
// first, through the agent's local socket, then the others over NBD+TLS.
// Replicas being replaced (Stale) or not served yet are left out; faulty
// ones are included, so that the engine resyncs them when they answer.
func (s *Node) replicaURIs(qv *v1alpha1.QuorumVolume) []string {
	reps := slices.Clone(qv.Status.Replicas)
	slices.SortStableFunc(reps, func(a, b v1alpha1.ReplicaStatus) int {
		switch {
		case a.Node == s.cfg.NodeName && b.Node != s.cfg.NodeName:
			return -1
		case b.Node == s.cfg.NodeName && a.Node != s.cfg.NodeName:
			return 1
		}
		return 0
	})
	certs := url.QueryEscape(s.cfg.TLSDir)
	var uris []string
	for _, r := range reps {
		if r.Endpoint == "" || r.State == v1alpha1.ReplicaStale {
			continue
		}
		if r.Node == s.cfg.NodeName {
			uris = append(uris, fmt.Sprintf("nbds+unix:///%s?socket=%s&tls-certificates=%s&tls-hostname=%s",
				qv.Name, url.QueryEscape(s.cfg.LocalSocket), certs, url.QueryEscape(s.cfg.TLSHostname)))
			continue
		}
		uris = append(uris, fmt.Sprintf("nbds://%s/%s?tls-certificates=%s", r.Endpoint, qv.Name, certs))
	}
	return uris
}

// forgetMetrics drops the volume's series once it is no longer staged.
func (sv *stagedVolume) forgetMetrics() {
	if sv.metrics != nil {
		sv.metrics.Remove()
	}
}

// attach makes sv's block device with the configured frontend, serving
// v: sv's engine, measured when metrics are on.
func (s *Node) attach(ctx context.Context, id string, sv *stagedVolume, v attach.Volume) error {
	dir := filepath.Join(s.cfg.StateDir, id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state folder of volume %s: %w", id, err)
	}
	logf := func(f string, a ...any) { s.cfg.Logger.Info(fmt.Sprintf(f, a...), "volume", id) }
	var err error
	sv.dev, err = attach.Attach(ctx, s.cfg.Frontend, v, attach.Options{
		BlockSize: sv.vol.BlockSize(), StateDir: dir, StateFile: filepath.Join(dir, s.cfg.Frontend), HolderDir: s.cfg.StateDir, Logf: logf,
	})
	if err != nil {
		return fmt.Errorf("attach volume %s (%s): %w", id, s.cfg.Frontend, err)
	}
	return nil
}

// stageDevice mounts a Filesystem volume at the staging path, making the
// filesystem first if the device has none (SafeFormatAndMount asks
// blkid, so an existing filesystem is never formatted over), or records
// a Block volume's device there.
func (s *Node) stageDevice(sv *stagedVolume, fsType string, flags []string) error {
	if sv.block {
		if err := os.MkdirAll(sv.stagingPath, 0o750); err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(sv.stagingPath, deviceFile), []byte(sv.dev.Path()), 0o600)
	}
	if err := os.MkdirAll(sv.stagingPath, 0o750); err != nil {
		return err
	}
	if err := s.growOffline(sv.dev.Path()); err != nil {
		return err
	}
	return s.mounter.FormatAndMount(sv.dev.Path(), sv.stagingPath, fsType, flags)
}

// growOffline grows an ext2/3/4 filesystem that is smaller than its
// device, which it is after the volume was expanded while unstaged,
// before it is mounted. Offline, resize2fs writes the device itself;
// online it needs the kernel's resize ioctl and with it CAP_SYS_RESOURCE,
// which a node plugin's container may lack. XFS grows only when mounted,
// in NodeExpandVolume.
func (s *Node) growOffline(dev string) error {
	if ext, smaller, err := s.extFilesystem(dev); err != nil || !ext || !smaller {
		return err
	}
	// resize2fs wants a freshly checked filesystem; e2fsck -p exits 1
	// when it corrected something, which is no reason to stop.
	if out, err := exec.Command("e2fsck", "-f", "-p", dev).CombinedOutput(); err != nil {
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() > 1 {
			return fmt.Errorf("check the filesystem on %s before growing it: %w: %s", dev, err, out)
		}
	}
	if out, err := exec.Command("resize2fs", dev).CombinedOutput(); err != nil {
		return fmt.Errorf("grow the filesystem on %s: %w: %s", dev, err, out)
	}
	return nil
}

// extFilesystem reports whether dev holds an ext2/3/4 filesystem and,
// if so, whether that leaves at least one of its blocks of the device
// unused.
func (s *Node) extFilesystem(dev string) (ext, smaller bool, err error) {
	format, err := s.mounter.GetDiskFormat(dev)
	if err != nil {
		return false, false, fmt.Errorf("filesystem on %s: %w", dev, err)
	}
	if format != "ext2" && format != "ext3" && format != "ext4" {
		return false, false, nil
	}
	smaller, err = extSmallerThanDevice(dev)
	return true, smaller, err
}

// extSmallerThanDevice compares the block count and size dumpe2fs reads
// from the superblock with the device size.
func extSmallerThanDevice(dev string) (bool, error) {
	out, err := exec.Command("dumpe2fs", "-h", dev).Output()
	if err != nil {
		return false, fmt.Errorf("dumpe2fs -h %s: %w", dev, err)
	}
	var blocks, blockSize int64
	for _, line := range strings.Split(string(out), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch k {
		case "Block count":
			blocks, err = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		case "Block size":
			blockSize, err = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
		if err != nil {
			return false, fmt.Errorf("dumpe2fs -h %s: %s: %w", dev, k, err)
		}
	}
	if blocks == 0 || blockSize == 0 {
		return false, fmt.Errorf("dumpe2fs -h %s: no block count or size in %q", dev, out)
	}
	size, err := deviceSize(dev)
	if err != nil {
		return false, err
	}
	return size >= (blocks+1)*blockSize, nil
}

func (s *Node) lookup(id string) *stagedVolume {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.staged[id]
}

// NodeUnstageVolume unmounts the staging path, detaches the device once
// nothing uses it (within detachTimeout) and closes the engine, which
// marks the replicas clean. A volume this process did not stage (or no
// longer knows, after a restart) only has its staging path cleaned.
func (s *Node) NodeUnstageVolume(ctx context.Context, req *csipb.NodeUnstageVolumeRequest) (*csipb.NodeUnstageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	switch {
	case id == "":
		return nil, fmt.Errorf("%w: volume_id missing", errInvalidArgument)
	case staging == "":
		return nil, fmt.Errorf("%w: staging_target_path missing", errInvalidArgument)
	}
	release, err := s.locks.acquire(id, "NodeUnstageVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	if err := s.unmount(staging); err != nil {
		return nil, fmt.Errorf("unstage volume %s: %w", id, err)
	}
	if err := os.Remove(filepath.Join(staging, deviceFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("unstage volume %s: %w", id, err)
	}
	sv := s.lookup(id)
	if sv == nil {
		return &csipb.NodeUnstageVolumeResponse{}, nil
	}
	dctx, cancel := context.WithTimeout(ctx, detachTimeout)
	defer cancel()
	if err := sv.dev.Detach(dctx); err != nil {
		return nil, fmt.Errorf("%w: detach %s of volume %s: %w", errFailedPrecondition, sv.dev.Path(), id, err)
	}
	sv.stopProbe()
	sv.forgetMetrics()
	s.mu.Lock()
	delete(s.staged, id)
	s.mu.Unlock()
	if err := sv.vol.Close(context.WithoutCancel(ctx)); err != nil {
		return nil, fmt.Errorf("close volume %s: %w", id, err)
	}
	logr.FromContextOrDiscard(ctx).Info("unstaged", "device", sv.dev.Path())
	return &csipb.NodeUnstageVolumeResponse{}, nil
}

// unmount unmounts path if something is mounted there. The path itself
// stays: the CO made the staging folder and removes it.
func (s *Node) unmount(path string) error {
	mounted, err := s.mounter.IsMountPoint(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check mount %s: %w", path, err)
	}
	if mounted {
		if err := s.mounter.Unmount(path); err != nil {
			return fmt.Errorf("unmount %s: %w", path, err)
		}
	}
	return nil
}

// NodePublishVolume bind-mounts the staged filesystem onto the target
// folder, or the staged device onto the target file for Block access.
func (s *Node) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	id, staging, target := req.GetVolumeId(), req.GetStagingTargetPath(), req.GetTargetPath()
	switch {
	case id == "":
		return nil, fmt.Errorf("%w: volume_id missing", errInvalidArgument)
	case staging == "":
		return nil, fmt.Errorf("%w: staging_target_path missing", errInvalidArgument)
	case target == "":
		return nil, fmt.Errorf("%w: target_path missing", errInvalidArgument)
	case req.GetVolumeCapability() == nil:
		return nil, fmt.Errorf("%w: volume_capability missing", errInvalidArgument)
	}
	if err := checkCapability(req.GetVolumeCapability(), req.GetVolumeContext()[VolumeContextFSType]); err != nil {
		return nil, fmt.Errorf("volume_capability: %w", err)
	}
	block := isBlock(req.GetVolumeCapability())
	single := req.GetVolumeCapability().GetAccessMode().GetMode() == csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
	release, err := s.locks.acquire(id, "NodePublishVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	sv := s.lookup(id)
	if sv != nil {
		for t, exclusive := range sv.targets {
			if t != target && (single || exclusive) {
				return nil, fmt.Errorf("%w: volume %s is already published at %s and SINGLE_NODE_SINGLE_WRITER allows one", errFailedPrecondition, id, t)
			}
		}
	}
	source := staging
	if block {
		dev, err := os.ReadFile(filepath.Join(staging, deviceFile))
		if err != nil {
			return nil, fmt.Errorf("%w: volume %s is not staged for Block access at %s: %w", errFailedPrecondition, id, staging, err)
		}
		source = string(dev)
		if err := makeFile(target); err != nil {
			return nil, fmt.Errorf("publish volume %s: %w", id, err)
		}
	} else {
		if mounted, err := s.mounter.IsMountPoint(staging); err != nil || !mounted {
			return nil, fmt.Errorf("%w: volume %s is not staged at %s", errFailedPrecondition, id, staging)
		}
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, fmt.Errorf("publish volume %s: %w", id, err)
		}
	}
	mounted, err := s.mounter.IsMountPoint(target)
	if err != nil {
		return nil, fmt.Errorf("publish volume %s: check mount %s: %w", id, target, err)
	}
	if mounted {
		s.published(sv, target, single)
		return &csipb.NodePublishVolumeResponse{}, nil
	}
	opts := []string{"bind"}
	if req.GetReadonly() {
		opts = append(opts, "ro")
	}
	if !block {
		opts = append(opts, req.GetVolumeCapability().GetMount().GetMountFlags()...)
	}
	if err := s.mounter.Mount(source, target, "", opts); err != nil {
		return nil, fmt.Errorf("publish volume %s: %w", id, err)
	}
	s.published(sv, target, single)
	return &csipb.NodePublishVolumeResponse{}, nil
}

// published records a target of sv, a volume this process staged.
func (s *Node) published(sv *stagedVolume, target string, single bool) {
	if sv == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sv.targets[target] = single
}

// makeFile creates the target of a Block bind mount, a regular file,
// with its folder.
func makeFile(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY, 0o640)
	if err != nil {
		return err
	}
	return f.Close()
}

// NodeUnpublishVolume unmounts the target and removes it.
func (s *Node) NodeUnpublishVolume(ctx context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	switch {
	case id == "":
		return nil, fmt.Errorf("%w: volume_id missing", errInvalidArgument)
	case target == "":
		return nil, fmt.Errorf("%w: target_path missing", errInvalidArgument)
	}
	release, err := s.locks.acquire(id, "NodeUnpublishVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	if err := s.unmount(target); err != nil {
		return nil, fmt.Errorf("unpublish volume %s: %w", id, err)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("unpublish volume %s: %w", id, err)
	}
	if sv := s.lookup(id); sv != nil {
		s.mu.Lock()
		delete(sv.targets, target)
		s.mu.Unlock()
	}
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats reports the filesystem's bytes and inodes for a
// mounted path, or the device's size for a published block file.
func (s *Node) NodeGetVolumeStats(ctx context.Context, req *csipb.NodeGetVolumeStatsRequest) (*csipb.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	switch {
	case id == "":
		return nil, fmt.Errorf("%w: volume_id missing", errInvalidArgument)
	case path == "":
		return nil, fmt.Errorf("%w: volume_path missing", errInvalidArgument)
	}
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: volume path %s", errNotFound, path)
	}
	if err != nil {
		return nil, fmt.Errorf("volume stats of %s: %w", path, err)
	}
	if mounted, err := s.mounter.IsMountPoint(path); err != nil || !mounted {
		return nil, fmt.Errorf("%w: volume %s is not mounted at %s", errNotFound, id, path)
	}
	if !fi.IsDir() {
		size, err := deviceSize(path)
		if err != nil {
			return nil, fmt.Errorf("volume stats of %s: %w", path, err)
		}
		return &csipb.NodeGetVolumeStatsResponse{Usage: []*csipb.VolumeUsage{{Unit: csipb.VolumeUsage_BYTES, Total: size}}}, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, fmt.Errorf("volume stats of %s: %w", path, err)
	}
	bs := st.Bsize
	return &csipb.NodeGetVolumeStatsResponse{Usage: []*csipb.VolumeUsage{
		{Unit: csipb.VolumeUsage_BYTES, Total: int64(st.Blocks) * bs, Available: int64(st.Bavail) * bs, Used: int64(st.Blocks-st.Bfree) * bs},
		{Unit: csipb.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree), Used: int64(st.Files - st.Ffree)},
	}}, nil
}

// deviceSize is the size of the block device at path (a bind mount of
// one counts).
func deviceSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	size, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return 0, fmt.Errorf("BLKGETSIZE64: %w", err)
	}
	return int64(size), nil
}

// NodeExpandVolume grows the filesystem of a staged volume to its
// device. The engine cannot grow an assembled volume yet: the agents
// grow the replica images when the QuorumVolume's size grows, and the
// device has the new size from the volume's next NodeStageVolume. So a
// staged volume whose device is still smaller than required_bytes is
// FAILED_PRECONDITION (the CO retries; the expansion completes after the
// pod restarts), and one staged since is grown in place: an ext
// filesystem already was, offline, by NodeStageVolume (growOffline), so
// only XFS is grown here.
func (s *Node) NodeExpandVolume(ctx context.Context, req *csipb.NodeExpandVolumeRequest) (*csipb.NodeExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	switch {
	case id == "":
		return nil, fmt.Errorf("%w: volume_id missing", errInvalidArgument)
	case req.GetVolumePath() == "":
		return nil, fmt.Errorf("%w: volume_path missing", errInvalidArgument)
	}
	release, err := s.locks.acquire(id, "NodeExpandVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	sv := s.lookup(id)
	if sv == nil {
		return nil, fmt.Errorf("%w: volume %s is not staged on node %s", errNotFound, id, s.cfg.NodeName)
	}
	size, err := deviceSize(sv.dev.Path())
	if err != nil {
		return nil, fmt.Errorf("expand volume %s: %w", id, err)
	}
	if need := req.GetCapacityRange().GetRequiredBytes(); need > size {
		return nil, fmt.Errorf("%w: volume %s is assembled with %d bytes and cannot grow to %d while staged; it has its new size from its next stage", errFailedPrecondition, id, size, need)
	}
	if !sv.block {
		// An ext filesystem grew at stage (growOffline); asking resize2fs
		// again, online, could fail for want of CAP_SYS_RESOURCE.
		ext, smaller, err := s.extFilesystem(sv.dev.Path())
		if err != nil {
			return nil, fmt.Errorf("expand volume %s: %w", id, err)
		}
		if ext && !smaller {
			return &csipb.NodeExpandVolumeResponse{CapacityBytes: size}, nil
		}
		if _, err := mount.NewResizeFs(utilexec.New()).Resize(sv.dev.Path(), sv.stagingPath); err != nil {
			return nil, fmt.Errorf("expand the filesystem of volume %s: %w", id, err)
		}
	}
	return &csipb.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}

// Close detaches every staged volume (forcibly: the node plugin is going
// away and the CO stages again where it needs to) and closes the engines.
func (s *Node) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for id, sv := range s.staged {
		sv.stopProbe()
		sv.forgetMetrics()
		if sv.stagingPath != "" && !sv.block {
			errs = append(errs, s.unmount(sv.stagingPath))
		}
		errs = append(errs, sv.dev.ForceDetach(), sv.vol.Close(context.Background()))
		delete(s.staged, id)
	}
	return errors.Join(errs...)
}

// eventInterval is the least time between two Kubernetes Events of one
// kind about one replica: a replica failing under load fails every
// request in flight, and each is an engine event.
const eventInterval = 10 * time.Second

// eventSink turns the engine's events into Warning Events on the volume,
// at most one per kind and replica every eventInterval; the engine's own
// log keeps every one.
func (s *Node) eventSink(qv *v1alpha1.QuorumVolume) func(quorum.Event) {
	if s.cfg.Events == nil {
		return nil
	}
	var mu sync.Mutex
	last := map[string]time.Time{}
	return func(e quorum.Event) {
		key := string(e.Type) + "/" + e.Child
		mu.Lock()
		if time.Since(last[key]) < eventInterval {
			mu.Unlock()
			return
		}
		last[key] = time.Now()
		mu.Unlock()
		note := fmt.Sprintf("%s of %d bytes at %d", e.Op, e.Length, e.Offset)
		if e.Child != "" {
			note += " on replica " + e.Child
		}
		if e.Error != "" {
			note += ": " + e.Error
		}
		// The engine calls this on its request path: never wait there
		// for the API server.
		go controller.RecordEvent(context.Background(), s.cfg.Events, qv, corev1.EventTypeWarning,
			"quorum-node", "quorum-node-"+s.cfg.NodeName, string(e.Type), string(e.Op), note)
	}
}
