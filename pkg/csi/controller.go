package csi

import (
	"context"
	"fmt"
	"maps"
	"os"
	"strconv"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	kerrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/events"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
	"github.com/quorum-csi/quorum-csi/pkg/contract"
)

const (
	// TopologyKeyNode is the topology segment naming a node. The node
	// service reports it in NodeGetInfo; CreateVolume takes the node of
	// the first preferred topology (the consumer's node under
	// WaitForFirstConsumer) as spec.placement.preferredNode.
	TopologyKeyNode = DriverName + "/node"

	// PublishContextEpoch carries the attachment's epoch from
	// ControllerPublishVolume to the node, which presents it to the
	// replica servers.
	PublishContextEpoch = DriverName + "/epoch"

	// PublishContextStandby is "true" when the attachment is a live
	// migration's Standby target: the node stages it without taking the
	// replicas over, until its first write activates it. Absent for the
	// Active attachment.
	PublishContextStandby = DriverName + "/standby"

	// VolumeContextFSType carries the StorageClass's fsType to the node.
	VolumeContextFSType = "fsType"

	// FieldManager owns the QuorumVolume specs this service writes.
	FieldManager = contract.CSIFieldManager
)

// Controller is the CSI Controller service. It holds no state of its own:
// every volume is a QuorumVolume, which the reconciler places and the
// agents serve; this service only writes specs and attachments and reads
// status.
type Controller struct {
	csipb.UnimplementedControllerServer
	client client.Client
	events events.EventRecorder
	locks  inflight
}

// NewController returns the Controller service. c should read from the API
// server rather than a cache: the answers (is the volume attached, does
// it exist) decide deletions and attachments, and a lagging cache would
// answer for a moment ago. c's scheme must know QuorumVolumes, Nodes and
// events.k8s.io/v1 (contract.Attach records Events through it).
func NewController(c client.Client) *Controller {
	host, _ := os.Hostname()
	rec := contract.NewEventRecorder(c, contract.ControllerFieldManager, contract.ControllerFieldManager+"-"+host)
	return &Controller{client: c, events: rec}
}

// CreateVolume makes a QuorumVolume and returns at once, without waiting
// for its replicas to be placed or created: placement needs nodes that
// may not exist yet, a QuorumVolume reports its own progress (kubectl get
// qv), and the consumer's node waits for the replicas where it needs
// them, in NodeStageVolume. The volume is reachable from every node (over
// NBD), so accessible_topology stays empty.
func (s *Controller) CreateVolume(ctx context.Context, req *csipb.CreateVolumeRequest) (*csipb.CreateVolumeResponse, error) {
	name := req.GetName()
	if err := required(arg{"name", name != ""}); err != nil {
		return nil, err
	}
	if req.GetVolumeContentSource() != nil {
		return nil, fmt.Errorf("%w: volume_content_source: snapshots and clones are not supported", errInvalidArgument)
	}
	p, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, err
	}
	if err := checkCapabilities(req.GetVolumeCapabilities(), p.fsType); err != nil {
		return nil, err
	}
	size, err := volumeSize(req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	id := volumeID(name)
	release, err := s.locks.acquire(id, "CreateVolume")
	if err != nil {
		return nil, err
	}
	defer release()

	qv := &v1alpha1.QuorumVolume{
		ObjectMeta: metav1.ObjectMeta{Name: id, Annotations: map[string]string{AnnotationCSIName: name}},
		Spec:       p.spec,
	}
	if p.fsType != "" {
		qv.Annotations[AnnotationFSType] = p.fsType
	}
	qv.Spec.Size = *resource.NewQuantity(size, resource.BinarySI)
	qv.Spec.Placement.PreferredNode = preferredNode(req.GetAccessibilityRequirements())
	err = s.client.Create(ctx, qv, client.FieldOwner(FieldManager))
	if kerrors.IsAlreadyExists(err) {
		qv = &v1alpha1.QuorumVolume{}
		if err := s.client.Get(ctx, client.ObjectKey{Name: id}, qv); err != nil {
			return nil, fmt.Errorf("get existing QuorumVolume %s: %w", id, err)
		}
		if err := sameVolume(qv, name, p, req.GetCapacityRange()); err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, fmt.Errorf("create QuorumVolume %s: %w", id, err)
	}
	return &csipb.CreateVolumeResponse{Volume: csiVolume(qv)}, nil
}

// sameVolume says whether an existing volume is what a retried
// CreateVolume asks for: made for the same name, with the same
// parameters (fsType included) and a size within the capacity range.
// Anything else is errAlreadyExists, listing the differences; a volume
// being deleted is errAborted, so the CO retries until it is gone.
func sameVolume(qv *v1alpha1.QuorumVolume, name string, p volumeParams, r *csipb.CapacityRange) error {
	if qv.DeletionTimestamp != nil {
		return fmt.Errorf("%w: volume %s is being deleted", errAborted, qv.Name)
	}
	var diffs []string
	differ := func(what string, have, want any) {
		diffs = append(diffs, fmt.Sprintf("%s is %v, requested %v", what, have, want))
	}
	if have := qv.Annotations[AnnotationCSIName]; have != name {
		differ("the volume's request name (annotation "+AnnotationCSIName+")", strconv.Quote(have), strconv.Quote(name))
	}
	if have := qv.Annotations[AnnotationFSType]; have != p.fsType {
		differ(ParamFSType, strconv.Quote(have), strconv.Quote(p.fsType))
	}
	have, want := &qv.Spec, &p.spec
	if have.Replicas != want.Replicas {
		differ(ParamReplicas, have.Replicas, want.Replicas)
	}
	if a, b := have.EffectiveVoteThreshold(), want.EffectiveVoteThreshold(); a != b {
		differ(ParamVoteThreshold, a, b)
	}
	if have.ReadPattern != want.ReadPattern {
		differ(ParamReadPattern, have.ReadPattern, want.ReadPattern)
	}
	if have.RewriteCorrupted != want.RewriteCorrupted {
		differ(ParamRewriteCorrupted, have.RewriteCorrupted, want.RewriteCorrupted)
	}
	if !maps.Equal(have.Placement.NodeSelector, want.Placement.NodeSelector) {
		differ(ParamNodeSelector, have.Placement.NodeSelector, want.Placement.NodeSelector)
	}
	if have.Placement.SpreadKey != want.Placement.SpreadKey {
		differ(ParamTopologySpreadKey, have.Placement.SpreadKey, want.Placement.SpreadKey)
	}
	if size := have.Size.Value(); !fitsRange(size, r) {
		differ("size", size, fmt.Sprintf("required_bytes %d, limit_bytes %d", r.GetRequiredBytes(), r.GetLimitBytes()))
	}
	if len(diffs) > 0 {
		return fmt.Errorf("%w: volume %s exists and differs: %s", errAlreadyExists, qv.Name, strings.Join(diffs, "; "))
	}
	return nil
}

// preferredNode is the node of the first preferred topology that names
// one, or "".
func preferredNode(t *csipb.TopologyRequirement) string {
	for _, seg := range t.GetPreferred() {
		if node := seg.GetSegments()[TopologyKeyNode]; node != "" {
			return node
		}
	}
	return ""
}

// DeleteVolume deletes the QuorumVolume; the reconciler and the agents
// remove the replicas behind its finalizer. A volume that is gone, or
// already being deleted, is deleted. A published volume is refused with
// FAILED_PRECONDITION: the CO unpublishes first, and deleting it would
// pull the replicas from under a running consumer.
func (s *Controller) DeleteVolume(ctx context.Context, req *csipb.DeleteVolumeRequest) (*csipb.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	release, err := s.locks.begin(id, "DeleteVolume", arg{"volume_id", id != ""})
	if err != nil {
		return nil, err
	}
	defer release()
	err = retry.OnError(contract.ConflictBackoff, kerrors.IsConflict, func() error {
		qv := &v1alpha1.QuorumVolume{}
		if err := s.client.Get(ctx, client.ObjectKey{Name: id}, qv); err != nil {
			return client.IgnoreNotFound(err)
		}
		if qv.DeletionTimestamp != nil {
			return nil
		}
		if len(qv.Status.Attachments) > 0 {
			return fmt.Errorf("%w: volume %s is published to %s", errFailedPrecondition, id, attachedNodes(qv))
		}
		// The resourceVersion precondition makes an attach that lands
		// between the Get and the Delete a conflict, retried above, rather
		// than a deleted volume with a consumer.
		return client.IgnoreNotFound(s.client.Delete(ctx, qv, client.Preconditions{UID: &qv.UID, ResourceVersion: &qv.ResourceVersion}))
	})
	if err != nil {
		return nil, fmt.Errorf("delete QuorumVolume %s: %w", id, err)
	}
	return &csipb.DeleteVolumeResponse{}, nil
}

// ControllerPublishVolume attaches the volume to the node
// (contract.Attach) and hands the node its epoch. It does not wait for
// the replicas: the attachment only decides who may write and with which
// epoch, and NodeStageVolume waits until the replicas can be assembled.
// A second publish of a multi-node (Block) volume is a live migration's
// target: a Standby attachment with a newer epoch, which the publish
// context tells the node. A single-node volume attached elsewhere, or a
// multi-node one with two attachments already, is FAILED_PRECONDITION;
// a volume or node that does not exist is NOT_FOUND.
func (s *Controller) ControllerPublishVolume(ctx context.Context, req *csipb.ControllerPublishVolumeRequest) (*csipb.ControllerPublishVolumeResponse, error) {
	id, node := req.GetVolumeId(), req.GetNodeId()
	release, err := s.locks.begin(id, "ControllerPublishVolume", arg{"volume_id", id != ""}, arg{"node_id", node != ""}, arg{"volume_capability", req.GetVolumeCapability() != nil})
	if err != nil {
		return nil, err
	}
	defer release()
	qv, err := s.getVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := checkCapability(req.GetVolumeCapability(), qv.Annotations[AnnotationFSType]); err != nil {
		return nil, fmt.Errorf("volume_capability: %w", err)
	}
	if err := s.client.Get(ctx, client.ObjectKey{Name: node}, &corev1.Node{}); kerrors.IsNotFound(err) {
		return nil, fmt.Errorf("%w: node %s", errNotFound, node)
	} else if err != nil {
		return nil, fmt.Errorf("get node %s: %w", node, err)
	}
	att, err := contract.Attach(ctx, s.client, s.events, id, node, multiNode(req.GetVolumeCapability()))
	if err != nil {
		return nil, err
	}
	pc := map[string]string{PublishContextEpoch: strconv.FormatInt(att.Epoch, 10)}
	if att.Role == v1alpha1.AttachmentStandby {
		pc[PublishContextStandby] = "true"
	}
	return &csipb.ControllerPublishVolumeResponse{PublishContext: pc}, nil
}

// ControllerUnpublishVolume detaches the volume from the node, or from
// every node when node_id is empty (as the spec asks). During a live
// migration, unpublishing the source confirms it and unpublishing the
// target rolls it back (contract.Detach). A volume or attachment that is
// gone is detached.
func (s *Controller) ControllerUnpublishVolume(ctx context.Context, req *csipb.ControllerUnpublishVolumeRequest) (*csipb.ControllerUnpublishVolumeResponse, error) {
	id, node := req.GetVolumeId(), req.GetNodeId()
	release, err := s.locks.begin(id, "ControllerUnpublishVolume", arg{"volume_id", id != ""})
	if err != nil {
		return nil, err
	}
	defer release()
	nodes := []string{node}
	if node == "" {
		qv := &v1alpha1.QuorumVolume{}
		if err := s.client.Get(ctx, client.ObjectKey{Name: id}, qv); err != nil {
			if kerrors.IsNotFound(err) {
				return &csipb.ControllerUnpublishVolumeResponse{}, nil
			}
			return nil, fmt.Errorf("get QuorumVolume %s: %w", id, err)
		}
		nodes = nodes[:0]
		for _, a := range qv.Status.Attachments {
			nodes = append(nodes, a.Node)
		}
	}
	for _, n := range nodes {
		if err := contract.Detach(ctx, s.client, s.events, id, n); err != nil {
			return nil, err
		}
	}
	return &csipb.ControllerUnpublishVolumeResponse{}, nil
}

// ValidateVolumeCapabilities confirms the capabilities (and parameters)
// when CreateVolume would have accepted them for this volume, and
// otherwise says why not.
func (s *Controller) ValidateVolumeCapabilities(ctx context.Context, req *csipb.ValidateVolumeCapabilitiesRequest) (*csipb.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if err := required(arg{"volume_id", id != ""}, arg{"volume_capabilities", len(req.GetVolumeCapabilities()) > 0}); err != nil {
		return nil, err
	}
	qv, err := s.getVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	if _, err := parseParams(req.GetParameters()); err != nil {
		return &csipb.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	if err := checkCapabilities(req.GetVolumeCapabilities(), qv.Annotations[AnnotationFSType]); err != nil {
		return &csipb.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csipb.ValidateVolumeCapabilitiesResponse{Confirmed: &csipb.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// ControllerExpandVolume grows spec.size; the agents grow the replica
// images. node_expansion_required is true in both access modes: the
// consumer's node assembles the volume at its new size at its next
// NodeStageVolume (the engine cannot grow an assembled device), and
// NodeExpandVolume grows the filesystem in Filesystem mode and checks
// the device's size in both (see its doc). A size at or below the current
// one changes nothing: volumes never shrink. Growing a published volume
// is FAILED_PRECONDITION, the spec's code for a plugin without ONLINE
// expansion: the engine cannot grow an assembled device. The check and
// the write are one step, since the Update carries the resourceVersion
// of the read that saw no attachment.
func (s *Controller) ControllerExpandVolume(ctx context.Context, req *csipb.ControllerExpandVolumeRequest) (*csipb.ControllerExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if err := required(arg{"volume_id", id != ""}, arg{"capacity_range.required_bytes", req.GetCapacityRange().GetRequiredBytes() != 0}); err != nil {
		return nil, err
	}
	size, err := volumeSize(req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	release, err := s.locks.acquire(id, "ControllerExpandVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	var result int64
	err = retry.OnError(contract.ConflictBackoff, kerrors.IsConflict, func() error {
		qv, err := s.getVolume(ctx, id)
		if err != nil {
			return err
		}
		if c := req.GetVolumeCapability(); c != nil {
			if err := checkCapability(c, qv.Annotations[AnnotationFSType]); err != nil {
				return fmt.Errorf("volume_capability: %w", err)
			}
		}
		result = qv.Spec.Size.Value()
		if result >= size {
			if limit := req.GetCapacityRange().GetLimitBytes(); limit > 0 && result > limit {
				return fmt.Errorf("%w: volume %s is already %d bytes, above limit_bytes %d, and cannot shrink", errOutOfRange, id, result, limit)
			}
			return nil
		}
		if len(qv.Status.Attachments) > 0 {
			return fmt.Errorf("%w: volume %s is published to %s and can only be expanded offline", errFailedPrecondition, id, attachedNodes(qv))
		}
		qv.Spec.Size = *resource.NewQuantity(size, resource.BinarySI)
		if err := s.client.Update(ctx, qv, client.FieldOwner(FieldManager)); err != nil {
			return err
		}
		result = size
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("expand QuorumVolume %s: %w", id, err)
	}
	return &csipb.ControllerExpandVolumeResponse{CapacityBytes: result, NodeExpansionRequired: true}, nil
}

// ExpandVolume is ControllerExpandVolume for the controller's PVC
// resizer (controller.VolumeExpander), in process. Its error keeps the
// handler's message and carries the gRPC code the call would have
// returned (status.Code).
func (s *Controller) ExpandVolume(ctx context.Context, volume string, bytes int64) (int64, error) {
	resp, err := s.ControllerExpandVolume(ctx, &csipb.ControllerExpandVolumeRequest{
		VolumeId:      volume,
		CapacityRange: &csipb.CapacityRange{RequiredBytes: bytes},
	})
	if err != nil {
		return 0, codedError{err: err, status: status.Convert(toStatus(err))}
	}
	return resp.GetCapacityBytes(), nil
}

// codedError is a handler's error with the status the server would
// answer it with.
type codedError struct {
	err    error
	status *status.Status
}

func (e codedError) Error() string              { return e.err.Error() }
func (e codedError) Unwrap() error              { return e.err }
func (e codedError) GRPCStatus() *status.Status { return e.status }

// ControllerGetVolume reports the volume and the nodes it is published to.
// Its health is ControllerGetVolumeHealth's: CSI v1.13 removed the
// VolumeCondition this response used to carry.
func (s *Controller) ControllerGetVolume(ctx context.Context, req *csipb.ControllerGetVolumeRequest) (*csipb.ControllerGetVolumeResponse, error) {
	qv, err := s.getVolume(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	return &csipb.ControllerGetVolumeResponse{
		Volume: csiVolume(qv),
		Status: &csipb.ControllerGetVolumeResponse_VolumeStatus{
			PublishedNodeIds: contract.AttachedNodes(qv),
		},
	}, nil
}

// ListVolumes pages through the QuorumVolumes with the API server's own
// list chunking: next_token is its continue token, so a listing is a
// consistent snapshot across pages. A token the API server does not
// accept (malformed, or expired after etcd compaction, about five
// minutes) is ABORTED, and the CO starts over. Volumes being deleted are
// left out, so a page may hold fewer than max_entries.
func (s *Controller) ListVolumes(ctx context.Context, req *csipb.ListVolumesRequest) (*csipb.ListVolumesResponse, error) {
	list, err := s.listVolumes(ctx, req.GetMaxEntries(), req.GetStartingToken())
	if err != nil {
		return nil, err
	}
	resp := &csipb.ListVolumesResponse{NextToken: list.Continue}
	for i := range list.Items {
		qv := &list.Items[i]
		resp.Entries = append(resp.Entries, &csipb.ListVolumesResponse_Entry{
			Volume: csiVolume(qv),
			Status: &csipb.ListVolumesResponse_VolumeStatus{
				PublishedNodeIds: contract.AttachedNodes(qv),
			},
		})
	}
	return resp, nil
}

// ControllerGetVolumeHealth reports the volume's health (volumeHealth).
func (s *Controller) ControllerGetVolumeHealth(ctx context.Context, req *csipb.ControllerGetVolumeHealthRequest) (*csipb.ControllerGetVolumeHealthResponse, error) {
	qv, err := s.getVolume(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	return &csipb.ControllerGetVolumeHealthResponse{VolumeHealth: volumeHealth(qv)}, nil
}

// ControllerListVolumeHealth lists the volumes with an adverse health
// condition, paged like ListVolumes (healthy ones are left out, as the
// spec asks, so pages may be short).
func (s *Controller) ControllerListVolumeHealth(ctx context.Context, req *csipb.ControllerListVolumeHealthRequest) (*csipb.ControllerListVolumeHealthResponse, error) {
	list, err := s.listVolumes(ctx, req.GetMaxEntries(), req.GetStartingToken())
	if err != nil {
		return nil, err
	}
	resp := &csipb.ControllerListVolumeHealthResponse{NextToken: list.Continue}
	for i := range list.Items {
		if h := volumeHealth(&list.Items[i]); len(h.HealthStatuses) > 0 {
			resp.Entries = append(resp.Entries, h)
		}
	}
	return resp, nil
}

// GetCapacity reports 0. The agents do not report their free space yet,
// so there is nothing honest to add up, and the spec allows 0 (the
// field must be set and not negative). The CSIDriver object therefore
// leaves storageCapacity false: with it true the scheduler would take
// the 0 literally and place no WaitForFirstConsumer pod. The parameters
// and capabilities are still checked, so a StorageClass that CreateVolume
// would refuse is refused here too.
func (s *Controller) GetCapacity(_ context.Context, req *csipb.GetCapacityRequest) (*csipb.GetCapacityResponse, error) {
	p, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, err
	}
	if caps := req.GetVolumeCapabilities(); len(caps) > 0 {
		if err := checkCapabilities(caps, p.fsType); err != nil {
			return nil, err
		}
	}
	return &csipb.GetCapacityResponse{AvailableCapacity: 0}, nil
}

// controllerCapabilities are exactly the calls this service implements.
// Snapshots and clones are not among them.
var controllerCapabilities = []csipb.ControllerServiceCapability_RPC_Type{
	csipb.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
	csipb.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME,
	csipb.ControllerServiceCapability_RPC_EXPAND_VOLUME,
	csipb.ControllerServiceCapability_RPC_LIST_VOLUMES,
	csipb.ControllerServiceCapability_RPC_LIST_VOLUMES_PUBLISHED_NODES,
	csipb.ControllerServiceCapability_RPC_GET_CAPACITY,
	csipb.ControllerServiceCapability_RPC_GET_VOLUME,
	csipb.ControllerServiceCapability_RPC_GET_VOLUME_HEALTH,
	csipb.ControllerServiceCapability_RPC_LIST_VOLUME_HEALTH,
	csipb.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
}

func (*Controller) ControllerGetCapabilities(context.Context, *csipb.ControllerGetCapabilitiesRequest) (*csipb.ControllerGetCapabilitiesResponse, error) {
	resp := &csipb.ControllerGetCapabilitiesResponse{}
	for _, t := range controllerCapabilities {
		resp.Capabilities = append(resp.Capabilities, &csipb.ControllerServiceCapability{
			Type: &csipb.ControllerServiceCapability_Rpc{Rpc: &csipb.ControllerServiceCapability_RPC{Type: t}},
		})
	}
	return resp, nil
}

// listVolumes reads one page of the volumes the CO may still use (those
// being deleted are left out), with the API server's list chunking.
func (s *Controller) listVolumes(ctx context.Context, maxEntries int32, token string) (*v1alpha1.QuorumVolumeList, error) {
	if maxEntries < 0 {
		return nil, fmt.Errorf("%w: max_entries %d is negative", errInvalidArgument, maxEntries)
	}
	var opts []client.ListOption
	if maxEntries > 0 {
		opts = append(opts, client.Limit(int64(maxEntries)))
	}
	if token != "" {
		opts = append(opts, client.Continue(token))
	}
	list := &v1alpha1.QuorumVolumeList{}
	if err := s.client.List(ctx, list, opts...); err != nil {
		if token != "" && (kerrors.IsBadRequest(err) || kerrors.IsResourceExpired(err) || kerrors.IsGone(err)) {
			return nil, fmt.Errorf("%w: starting_token %q: %w", errAborted, token, err)
		}
		return nil, fmt.Errorf("list QuorumVolumes: %w", err)
	}
	kept := list.Items[:0]
	for _, qv := range list.Items {
		if qv.DeletionTimestamp == nil {
			kept = append(kept, qv)
		}
	}
	list.Items = kept
	return list, nil
}

// getVolume reads a volume the CO may still use: one that is missing or
// being deleted (DeleteVolume succeeded for the CO) is errNotFound, and
// an empty id is the request's missing volume_id.
func (s *Controller) getVolume(ctx context.Context, id string) (*v1alpha1.QuorumVolume, error) {
	if err := required(arg{"volume_id", id != ""}); err != nil {
		return nil, err
	}
	qv := &v1alpha1.QuorumVolume{}
	if err := s.client.Get(ctx, client.ObjectKey{Name: id}, qv); kerrors.IsNotFound(err) {
		return nil, fmt.Errorf("%w: volume %s", errNotFound, id)
	} else if err != nil {
		return nil, fmt.Errorf("get QuorumVolume %s: %w", id, err)
	}
	if qv.DeletionTimestamp != nil {
		return nil, fmt.Errorf("%w: volume %s is being deleted", errNotFound, id)
	}
	return qv, nil
}

// csiVolume describes a QuorumVolume to the CO.
func csiVolume(qv *v1alpha1.QuorumVolume) *csipb.Volume {
	v := &csipb.Volume{VolumeId: qv.Name, CapacityBytes: qv.Spec.Size.Value()}
	if fs := qv.Annotations[AnnotationFSType]; fs != "" {
		v.VolumeContext = map[string]string{VolumeContextFSType: fs}
	}
	return v
}

func attachedNodes(qv *v1alpha1.QuorumVolume) string {
	return strings.Join(contract.AttachedNodes(qv), " and ")
}

// volumeHealth reports a Degraded volume (a replica is not Healthy;
// writes still reach voteThreshold replicas) as DEGRADED and a Faulted
// one (fewer than voteThreshold Healthy: writes fail) as INACCESSIBLE,
// each with the phase as reason and the Ready condition's message, which
// says replica by replica what is wrong. Pending and Ready volumes have
// no adverse condition.
func volumeHealth(qv *v1alpha1.QuorumVolume) *csipb.VolumeHealth {
	h := &csipb.VolumeHealth{VolumeId: qv.Name}
	var t csipb.VolumeHealthErrorType
	switch qv.Status.Phase {
	case v1alpha1.VolumeDegraded:
		t = csipb.VolumeHealthErrorType_DEGRADED
	case v1alpha1.VolumeFaulted:
		t = csipb.VolumeHealthErrorType_INACCESSIBLE
	default:
		return h
	}
	e := &csipb.VolumeHealth_VolumeHealthEntry{Status: t, Reason: string(qv.Status.Phase)}
	if c := meta.FindStatusCondition(qv.Status.Conditions, contract.ConditionReady); c != nil {
		e.Message = c.Message
	}
	h.HealthStatuses = []*csipb.VolumeHealth_VolumeHealthEntry{e}
	return h
}
