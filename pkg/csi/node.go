package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/datapath"
	"github.com/quorum-csi/quorum-csi/pkg/quorum"
)

const (
	// defaultFSType is made on a Filesystem volume whose volume context
	// names none.
	defaultFSType = "ext4"
	// deviceFile, in a Block volume's staging folder, names the device
	// NodePublishVolume binds.
	deviceFile = "quorum-device"
	// detachTimeout bounds NodeUnstageVolume's wait for the device's last
	// user (e.g. a filesystem still being unmounted by another process).
	detachTimeout = 30 * time.Second
	// pollInterval paces NodeStageVolume's wait for Healthy replicas.
	pollInterval = 500 * time.Millisecond
)

// DataPath is the node's data path (package datapath, in its own
// process): it owns the staged volumes' engines and devices, and their
// records, so a restart of this plugin touches none of them.
// *datapath.Client is the one the node binary uses.
type DataPath interface {
	Ready(ctx context.Context) error
	Stage(ctx context.Context, req datapath.StageRequest) (datapath.Status, error)
	Unstage(ctx context.Context, id string, wait time.Duration, force bool) error
	Get(ctx context.Context, id string) (datapath.Status, error)
	List(ctx context.Context) ([]datapath.Status, error)
	SetTarget(ctx context.Context, id string, t datapath.Target, published bool) error
}

// NodeConfig is what the Node service needs from the node binary.
type NodeConfig struct {
	// NodeName is the Kubernetes Node name: the node ID, and how the
	// node finds its own replica in a QuorumVolume's status.
	NodeName string
	// Client reads QuorumVolumes from the API server (not a cache: a
	// stage needs the replicas' current endpoints).
	Client client.Reader
	// DataPath serves the staged volumes.
	DataPath DataPath
	// TLSDir holds the NBD client certificates (ca-cert.pem,
	// client-cert.pem, client-key.pem) for every replica server, at the
	// same path in the data path's process.
	TLSDir string
	// LocalSocket is the node agent's Unix socket (agent.Config's
	// LocalSocket); the local replica is reached through it, so that its
	// writes are epoch-fenced like remote ones.
	LocalSocket string
	// TLSHostname is a name in the agent's server certificate, checked
	// on the local socket where there is no host to check.
	TLSHostname string
}

// Node is the CSI Node service: it has the node's data path serve a
// volume as a block device (NodeStageVolume), mounts it where the CO
// asks (NodePublishVolume), and takes it apart again.
type Node struct {
	csipb.UnimplementedNodeServer
	cfg     NodeConfig
	mounter *mount.SafeFormatAndMount
	locks   inflight
}

// NewNode returns the Node service. It mounts with the host's mount and
// mkfs tools.
func NewNode(cfg NodeConfig) (*Node, error) {
	if cfg.NodeName == "" || cfg.Client == nil || cfg.DataPath == nil || cfg.LocalSocket == "" || cfg.TLSDir == "" {
		return nil, errors.New("CSI node: node name, client, data path, local socket and TLS folder are required")
	}
	if cfg.TLSHostname == "" {
		cfg.TLSHostname = "localhost"
	}
	return &Node{
		cfg:     cfg,
		mounter: mount.NewSafeFormatAndMount(mount.New(""), utilexec.New()),
	}, nil
}

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

// staged asks the data path for the volume; nil, nil when it is not
// staged on this node. An empty id is the request's missing volume_id.
func (s *Node) staged(ctx context.Context, id string) (*datapath.Status, error) {
	if err := required(arg{"volume_id", id != ""}); err != nil {
		return nil, err
	}
	st, err := s.cfg.DataPath.Get(ctx, id)
	if errors.Is(err, datapath.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", id, err)
	}
	return &st, nil
}

// lockStaged takes the volume for method and asks the data path for it,
// as staged does.
func (s *Node) lockStaged(ctx context.Context, id, method string) (release func(), sv *datapath.Status, err error) {
	release, err = s.locks.acquire(id, method)
	if err != nil {
		return nil, nil, err
	}
	if sv, err = s.staged(ctx, id); err != nil {
		release()
		return nil, nil, err
	}
	return release, sv, nil
}

// NodeGetVolumeHealth reports the staged volume's replicas as the engine
// sees them: DEGRADED while some replica is faulty or resyncing but
// writes still reach the vote threshold, INACCESSIBLE when fewer
// replicas are healthy than the threshold or the data path lost the
// volume; the message says replica by replica what is wrong.
func (s *Node) NodeGetVolumeHealth(ctx context.Context, req *csipb.NodeGetVolumeHealthRequest) (*csipb.NodeGetVolumeHealthResponse, error) {
	id := req.GetVolumeId()
	sv, err := s.staged(ctx, id)
	if err != nil {
		return nil, err
	}
	if sv == nil {
		return nil, fmt.Errorf("volume %s is not staged on this node: %w", id, errNotFound)
	}
	h := &csipb.VolumeHealth{VolumeId: id}
	if sv.Lost != "" {
		h.HealthStatuses = []*csipb.VolumeHealth_VolumeHealthEntry{{
			Status: csipb.VolumeHealthErrorType_INACCESSIBLE, Reason: "DataPathLost", Message: sv.Lost,
		}}
		return &csipb.NodeGetVolumeHealthResponse{VolumeHealth: h}, nil
	}
	var bad []string
	healthy := 0
	for _, c := range sv.Children {
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
	case healthy < sv.VoteThreshold:
		h.HealthStatuses = []*csipb.VolumeHealth_VolumeHealthEntry{{
			Status: csipb.VolumeHealthErrorType_INACCESSIBLE, Reason: "BelowVoteThreshold",
			Message: fmt.Sprintf("%d healthy replicas, vote threshold %d: %s", healthy, sv.VoteThreshold, strings.Join(bad, "; ")),
		}}
	case len(bad) > 0:
		h.HealthStatuses = []*csipb.VolumeHealth_VolumeHealthEntry{{
			Status: csipb.VolumeHealthErrorType_DEGRADED, Reason: "ReplicasNotHealthy", Message: strings.Join(bad, "; "),
		}}
	}
	return &csipb.NodeGetVolumeHealthResponse{VolumeHealth: h}, nil
}

// NodeStageVolume has the data path assemble the volume from its
// replicas with the attachment's epoch and serve it as a block device,
// and, for Filesystem access, makes a filesystem on a new volume and
// mounts it at the staging path. It waits, within the call's deadline,
// until enough replicas are Healthy to take writes. A live migration's
// target (PublishContextStandby) is staged as a standby, so that the
// source, still running, is not fenced before the switchover.
func (s *Node) NodeStageVolume(ctx context.Context, req *csipb.NodeStageVolumeRequest) (*csipb.NodeStageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	if err := required(arg{"volume_id", id != ""}, arg{"staging_target_path", staging != ""}, arg{"volume_capability", req.GetVolumeCapability() != nil}); err != nil {
		return nil, err
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
	release, sv, err := s.lockStaged(ctx, id, "NodeStageVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	switch {
	case sv != nil && sv.Lost != "":
		return nil, fmt.Errorf("%w: volume %s was lost by this node's data path (%s); unstage it first", errFailedPrecondition, id, sv.Lost)
	case sv != nil && (sv.StagingPath != staging || sv.Block != block):
		return nil, fmt.Errorf("%w: volume %s is already staged at %s (block %t)", errAlreadyExists, id, sv.StagingPath, sv.Block)
	case sv != nil:
		// Staged, perhaps by a plugin that died before mounting: finish.
		if err := s.stageDevice(sv.Device, staging, block, fsType, req.GetVolumeCapability().GetMount().GetMountFlags()); err != nil {
			return nil, fmt.Errorf("stage volume %s: %w", id, err)
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
	standby, err := parseStandby(req.GetPublishContext())
	if err != nil {
		return nil, err
	}
	qv, err := s.waitReplicas(ctx, id)
	if err != nil {
		return nil, err
	}
	if _, err := quorum.ParseReadPattern(string(qv.Spec.ReadPattern)); err != nil {
		return nil, fmt.Errorf("volume %s: readPattern: %w", id, err)
	}
	st, err := s.cfg.DataPath.Stage(ctx, datapath.StageRequest{
		VolumeID:         id,
		Replicas:         s.replicaURIs(qv),
		Epoch:            epoch,
		VoteThreshold:    int(qv.Spec.EffectiveVoteThreshold()),
		ReadPattern:      string(qv.Spec.ReadPattern),
		RewriteCorrupted: qv.Spec.RewriteCorrupted,
		StagingPath:      staging,
		Block:            block,
		Standby:          standby,
	})
	if err != nil {
		return nil, fmt.Errorf("assemble volume %s with epoch %d: %w", id, epoch, err)
	}
	if err := s.stageDevice(st.Device, staging, block, fsType, req.GetVolumeCapability().GetMount().GetMountFlags()); err != nil {
		// Nothing uses a device that was never mounted: take it back.
		return nil, errors.Join(fmt.Errorf("stage volume %s: %w", id, err), s.cfg.DataPath.Unstage(context.WithoutCancel(ctx), id, 0, true))
	}
	logr.FromContextOrDiscard(ctx).Info("staged", "device", st.Device, "epoch", epoch, "frontend", st.Frontend, "block", block, "standby", standby)
	return &csipb.NodeStageVolumeResponse{}, nil
}

// parseStandby reads PublishContextStandby. A value other than "true" or
// absent is refused rather than read as false: staging a migration's
// target as Active would fence the running source at once.
func parseStandby(pc map[string]string) (bool, error) {
	switch v, ok := pc[PublishContextStandby]; {
	case !ok:
		return false, nil
	case v == "true":
		return true, nil
	default:
		return false, fmt.Errorf("%w: publish_context[%s]=%q: want \"true\" or absent", errInvalidArgument, PublishContextStandby, v)
	}
}

// stageDevice mounts a Filesystem volume at the staging path, making the
// filesystem first if the device has none (SafeFormatAndMount asks
// blkid, so an existing filesystem is never formatted over), or records
// a Block volume's device there. Either is idempotent.
func (s *Node) stageDevice(dev, staging string, block bool, fsType string, flags []string) error {
	if err := os.MkdirAll(staging, 0o750); err != nil {
		return err
	}
	if block {
		return os.WriteFile(filepath.Join(staging, deviceFile), []byte(dev), 0o600)
	}
	if mounted, err := s.mounter.IsMountPoint(staging); err != nil {
		return fmt.Errorf("check mount %s: %w", staging, err)
	} else if mounted {
		return nil
	}
	if err := s.growOffline(dev); err != nil {
		return err
	}
	return s.mounter.FormatAndMount(dev, staging, fsType, flags)
}

// NodeUnstageVolume unmounts the staging path and has the data path
// detach the device once nothing uses it (within detachTimeout) and
// close the engine, which marks the replicas clean. A volume the data
// path does not serve (never staged, or lost) only has its staging path
// cleaned.
func (s *Node) NodeUnstageVolume(ctx context.Context, req *csipb.NodeUnstageVolumeRequest) (*csipb.NodeUnstageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	release, err := s.locks.begin(id, "NodeUnstageVolume", arg{"volume_id", id != ""}, arg{"staging_target_path", staging != ""})
	if err != nil {
		return nil, err
	}
	defer release()
	if err := s.unmount(staging, filepath.Join(staging, deviceFile)); err != nil {
		return nil, fmt.Errorf("unstage volume %s: %w", id, err)
	}
	err = s.cfg.DataPath.Unstage(ctx, id, detachTimeout, false)
	if errors.Is(err, datapath.ErrBusy) {
		return nil, fmt.Errorf("%w: %w", errFailedPrecondition, err)
	}
	if err != nil {
		return nil, fmt.Errorf("unstage volume %s: %w", id, err)
	}
	logr.FromContextOrDiscard(ctx).Info("unstaged", "volume", id)
	return &csipb.NodeUnstageVolumeResponse{}, nil
}

// NodePublishVolume bind-mounts the staged filesystem onto the target
// folder, or the staged device onto the target file for Block access.
func (s *Node) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	id, staging, target := req.GetVolumeId(), req.GetStagingTargetPath(), req.GetTargetPath()
	if err := required(arg{"volume_id", id != ""}, arg{"staging_target_path", staging != ""}, arg{"target_path", target != ""}, arg{"volume_capability", req.GetVolumeCapability() != nil}); err != nil {
		return nil, err
	}
	if err := checkCapability(req.GetVolumeCapability(), req.GetVolumeContext()[VolumeContextFSType]); err != nil {
		return nil, fmt.Errorf("volume_capability: %w", err)
	}
	block := isBlock(req.GetVolumeCapability())
	single := req.GetVolumeCapability().GetAccessMode().GetMode() == csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
	release, sv, err := s.lockStaged(ctx, id, "NodePublishVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	if sv != nil {
		for t, exclusive := range sv.Targets {
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
	if !mounted {
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
	}
	if sv != nil {
		if err := s.cfg.DataPath.SetTarget(ctx, id, datapath.Target{Path: target, Single: single}, true); err != nil {
			return nil, fmt.Errorf("publish volume %s: %w", id, err)
		}
	}
	return &csipb.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts the target and removes it.
func (s *Node) NodeUnpublishVolume(ctx context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	release, err := s.locks.begin(id, "NodeUnpublishVolume", arg{"volume_id", id != ""}, arg{"target_path", target != ""})
	if err != nil {
		return nil, err
	}
	defer release()
	if err := s.unmount(target, target); err != nil {
		return nil, fmt.Errorf("unpublish volume %s: %w", id, err)
	}
	if err := s.cfg.DataPath.SetTarget(ctx, id, datapath.Target{Path: target}, false); err != nil {
		return nil, fmt.Errorf("unpublish volume %s: %w", id, err)
	}
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats reports the filesystem's bytes and inodes for a
// mounted path, or the device's size for a published block file.
func (s *Node) NodeGetVolumeStats(ctx context.Context, req *csipb.NodeGetVolumeStatsRequest) (*csipb.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if err := required(arg{"volume_id", id != ""}, arg{"volume_path", path != ""}); err != nil {
		return nil, err
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
	if err := required(arg{"volume_id", id != ""}, arg{"volume_path", req.GetVolumePath() != ""}); err != nil {
		return nil, err
	}
	release, sv, err := s.lockStaged(ctx, id, "NodeExpandVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	if sv == nil || sv.Lost != "" {
		return nil, fmt.Errorf("%w: volume %s is not staged on node %s", errNotFound, id, s.cfg.NodeName)
	}
	size, err := deviceSize(sv.Device)
	if err != nil {
		return nil, fmt.Errorf("expand volume %s: %w", id, err)
	}
	if need := req.GetCapacityRange().GetRequiredBytes(); need > size {
		return nil, fmt.Errorf("%w: volume %s is assembled with %d bytes and cannot grow to %d while staged; it has its new size from its next stage", errFailedPrecondition, id, size, need)
	}
	if !sv.Block {
		// An ext filesystem grew at stage (growOffline); asking resize2fs
		// again, online, could fail for want of CAP_SYS_RESOURCE.
		ext, smaller, err := s.extFilesystem(sv.Device)
		if err != nil {
			return nil, fmt.Errorf("expand volume %s: %w", id, err)
		}
		if ext && !smaller {
			return &csipb.NodeExpandVolumeResponse{CapacityBytes: size}, nil
		}
		if _, err := mount.NewResizeFs(utilexec.New()).Resize(sv.Device, sv.StagingPath); err != nil {
			return nil, fmt.Errorf("expand the filesystem of volume %s: %w", id, err)
		}
	}
	return &csipb.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}
