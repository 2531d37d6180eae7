package csi

import (
	"slices"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

const (
	snw  = csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
	mnmw = csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER
)

// TestService drives the Identity and Controller services over a real
// gRPC connection, backed by a real API server with the reconciler
// running. The subtests share the server; each works on its own volumes.
func TestService(t *testing.T) {
	e := startEnv(t)
	for _, n := range []string{"node-a", "node-b", "node-c"} {
		e.node(n, "group", "abc")
	}
	for _, tc := range []struct {
		name string
		run  func(*env)
	}{
		{"identity", testIdentity},
		{"create idempotent", testCreateIdempotent},
		{"create invalid", testCreateInvalid},
		{"capacity", testCapacity},
		{"preferred node", testPreferredNode},
		{"publish single node", testPublishSingleNode},
		{"publish multi node block", testPublishMultiNode},
		{"expand", testExpand},
		{"list pagination", testListPagination},
		{"health", testHealth},
		{"delete while published", testDeletePublished},
		{"missing fields", testMissingFields},
	} {
		t.Run(tc.name, func(t *testing.T) { e.t = t; tc.run(e) })
	}
}

// expectCode fails unless err is a status with code whose message
// contains every one of texts.
func expectCode(t *testing.T, err error, code codes.Code, texts ...string) {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != code {
		t.Fatalf("got %v (%v), want %v", st.Code(), err, code)
	}
	for _, s := range texts {
		if !strings.Contains(st.Message(), s) {
			t.Errorf("message %q does not contain %q", st.Message(), s)
		}
	}
}

func createReq(name string, size int64, params map[string]string, caps ...*csipb.VolumeCapability) *csipb.CreateVolumeRequest {
	if len(caps) == 0 {
		caps = []*csipb.VolumeCapability{mountCap(snw, "")}
	}
	return &csipb.CreateVolumeRequest{
		Name:               name,
		CapacityRange:      &csipb.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: caps,
		Parameters:         params,
	}
}

func (e *env) create(req *csipb.CreateVolumeRequest) *csipb.Volume {
	e.t.Helper()
	resp, err := e.ctl.CreateVolume(e.t.Context(), req)
	if err != nil {
		e.t.Fatalf("CreateVolume %s: %v", req.GetName(), err)
	}
	return resp.GetVolume()
}

func (e *env) publish(id, node string, c *csipb.VolumeCapability) (*csipb.ControllerPublishVolumeResponse, error) {
	return e.ctl.ControllerPublishVolume(e.t.Context(), &csipb.ControllerPublishVolumeRequest{VolumeId: id, NodeId: node, VolumeCapability: c})
}

func (e *env) unpublish(id, node string) {
	e.t.Helper()
	if _, err := e.ctl.ControllerUnpublishVolume(e.t.Context(), &csipb.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: node}); err != nil {
		e.t.Fatalf("ControllerUnpublishVolume %s from %s: %v", id, node, err)
	}
}

func testIdentity(e *env) {
	t, ctx := e.t, e.t.Context()
	info, err := e.ids.GetPluginInfo(ctx, &csipb.GetPluginInfoRequest{})
	if err != nil || info.GetName() != "quorum.csi.dev" || info.GetVendorVersion() != Version {
		t.Errorf("GetPluginInfo: %v, %v; want quorum.csi.dev %s", info, err, Version)
	}
	caps, err := e.ids.GetPluginCapabilities(ctx, &csipb.GetPluginCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range caps.GetCapabilities() {
		if s := c.GetService(); s != nil {
			got = append(got, s.GetType().String())
		}
		if x := c.GetVolumeExpansion(); x != nil {
			got = append(got, "expansion "+x.GetType().String())
		}
	}
	if want := []string{"CONTROLLER_SERVICE", "VOLUME_ACCESSIBILITY_CONSTRAINTS", "expansion OFFLINE"}; !slices.Equal(got, want) {
		t.Errorf("plugin capabilities %v, want %v", got, want)
	}
	probe, err := e.ids.Probe(ctx, &csipb.ProbeRequest{})
	if err != nil || !probe.GetReady().GetValue() {
		t.Errorf("Probe: %v, %v; want ready", probe, err)
	}
	ccaps, err := e.ctl.ControllerGetCapabilities(ctx, &csipb.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	got = got[:0]
	for _, c := range ccaps.GetCapabilities() {
		got = append(got, c.GetRpc().GetType().String())
	}
	want := []string{"CREATE_DELETE_VOLUME", "PUBLISH_UNPUBLISH_VOLUME", "EXPAND_VOLUME", "LIST_VOLUMES", "LIST_VOLUMES_PUBLISHED_NODES",
		"GET_CAPACITY", "GET_VOLUME", "GET_VOLUME_HEALTH", "LIST_VOLUME_HEALTH", "SINGLE_NODE_MULTI_WRITER"}
	if !slices.Equal(got, want) {
		t.Errorf("controller capabilities %v, want %v", got, want)
	}
	capacity, err := e.ctl.GetCapacity(ctx, &csipb.GetCapacityRequest{})
	if err != nil || capacity.GetAvailableCapacity() != 0 {
		t.Errorf("GetCapacity: %v, %v; want 0", capacity, err)
	}
	_, err = e.ctl.GetCapacity(ctx, &csipb.GetCapacityRequest{Parameters: map[string]string{"replicas": "9"}})
	expectCode(t, err, codes.InvalidArgument, "replicas")
}

func testCreateIdempotent(e *env) {
	t, ctx := e.t, e.t.Context()
	params := map[string]string{"replicas": "2", "readPattern": "quorum", "fsType": "xfs", "csi.storage.k8s.io/pvc/name": "data"}
	v1 := e.create(createReq("Idem_Volume", 1<<20, params))
	if v1.GetVolumeId() == "Idem_Volume" || !strings.HasPrefix(v1.GetVolumeId(), "idem-volume-") {
		t.Errorf("volume ID %q, want the sanitized name with a hash", v1.GetVolumeId())
	}
	if v1.GetCapacityBytes() != 1<<20 || v1.GetVolumeContext()[VolumeContextFSType] != "xfs" || len(v1.GetAccessibleTopology()) != 0 {
		t.Errorf("volume %v, want 1 MiB, fsType xfs, no topology", v1)
	}
	v2 := e.create(createReq("Idem_Volume", 1<<20, params))
	if !proto.Equal(v1, v2) {
		t.Errorf("second CreateVolume returned %v, want %v", v2, v1)
	}
	qv := e.get(v1.GetVolumeId())
	if qv.Annotations[AnnotationCSIName] != "Idem_Volume" || qv.Spec.Replicas != 2 || qv.Spec.ReadPattern != v1alpha1.ReadPatternQuorum ||
		qv.Spec.EffectiveVoteThreshold() != 2 || qv.Spec.Size.Value() != 1<<20 {
		t.Errorf("QuorumVolume %+v %+v, not what the parameters say", qv.Annotations, qv.Spec)
	}

	// A smaller request is satisfied by the existing volume; a larger one,
	// or other parameters, are not.
	if v := e.create(createReq("Idem_Volume", 4096, params)); v.GetCapacityBytes() != 1<<20 {
		t.Errorf("smaller retry: %v, want the existing 1 MiB volume", v)
	}
	_, err := e.ctl.CreateVolume(ctx, createReq("Idem_Volume", 2<<20, params))
	expectCode(t, err, codes.AlreadyExists, "size")
	other := map[string]string{"replicas": "3", "readPattern": "quorum", "fsType": "xfs"}
	_, err = e.ctl.CreateVolume(ctx, createReq("Idem_Volume", 1<<20, other))
	expectCode(t, err, codes.AlreadyExists, "replicas is 2, requested 3")
	delete(other, "fsType")
	other["replicas"] = "2"
	_, err = e.ctl.CreateVolume(ctx, createReq("Idem_Volume", 1<<20, other))
	expectCode(t, err, codes.AlreadyExists, "fsType")

	// A QuorumVolume made with kubectl under the same name is not ours.
	plain := &v1alpha1.QuorumVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "plain"},
		Spec:       v1alpha1.QuorumVolumeSpec{Size: resource.MustParse("4Ki"), Replicas: 3},
	}
	if err := e.c.Create(ctx, plain); err != nil {
		t.Fatal(err)
	}
	_, err = e.ctl.CreateVolume(ctx, createReq("plain", 4096, nil))
	expectCode(t, err, codes.AlreadyExists, AnnotationCSIName)
}

func testCreateInvalid(e *env) {
	t, ctx := e.t, e.t.Context()
	for _, tc := range []struct {
		params map[string]string
		name   string // what the message must name
	}{
		{map[string]string{"replicas": "8"}, "replicas"},
		{map[string]string{"voteThreshold": "4"}, "voteThreshold"},
		{map[string]string{"readPattern": "lifo"}, "readPattern"},
		{map[string]string{"rewriteCorrupted": "yes please"}, "rewriteCorrupted"},
		{map[string]string{"fsType": "vfat"}, "fsType"},
		{map[string]string{"nodeSelector": "a"}, "nodeSelector"},
		{map[string]string{"topologySpreadKey": "a b"}, "topologySpreadKey"},
		{map[string]string{"color": "blue"}, "color"},
	} {
		_, err := e.ctl.CreateVolume(ctx, createReq("invalid", 4096, tc.params))
		expectCode(t, err, codes.InvalidArgument, tc.name)
	}
	_, err := e.ctl.CreateVolume(ctx, createReq("invalid", 4096, nil, mountCap(mnmw, "")))
	expectCode(t, err, codes.InvalidArgument, "MULTI_NODE_MULTI_WRITER needs Block")
	_, err = e.ctl.CreateVolume(ctx, createReq("invalid", 4096, nil, blockCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)))
	expectCode(t, err, codes.InvalidArgument, "MULTI_NODE_READER_ONLY")
	_, err = e.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: "invalid"})
	expectCode(t, err, codes.InvalidArgument, "volume_capabilities")
	req := createReq("invalid", 4096, nil)
	req.VolumeContentSource = &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: "x"}}}
	_, err = e.ctl.CreateVolume(ctx, req)
	expectCode(t, err, codes.InvalidArgument, "clones")
	if err := e.c.Get(ctx, objectKey("invalid"), &v1alpha1.QuorumVolume{}); err == nil {
		t.Errorf("a refused CreateVolume left a QuorumVolume behind")
	}

	// ValidateVolumeCapabilities confirms what CreateVolume accepts.
	v := e.create(createReq("validate", 4096, map[string]string{"fsType": "ext4"}))
	resp, err := e.ctl.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{
		VolumeId: v.GetVolumeId(), VolumeCapabilities: []*csipb.VolumeCapability{blockCap(mnmw), mountCap(snw, "ext4")}})
	if err != nil || resp.GetConfirmed() == nil {
		t.Errorf("ValidateVolumeCapabilities block RWX + mount ext4: %v, %v; want confirmed", resp, err)
	}
	resp, err = e.ctl.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{
		VolumeId: v.GetVolumeId(), VolumeCapabilities: []*csipb.VolumeCapability{mountCap(snw, "xfs")}})
	if err != nil || resp.GetConfirmed() != nil || !strings.Contains(resp.GetMessage(), "fsType") {
		t.Errorf("ValidateVolumeCapabilities xfs on an ext4 volume: %v, %v; want unconfirmed naming fsType", resp, err)
	}
	_, err = e.ctl.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{
		VolumeId: "no-such-volume", VolumeCapabilities: []*csipb.VolumeCapability{mountCap(snw, "")}})
	expectCode(t, err, codes.NotFound)
}

func testCapacity(e *env) {
	t, ctx := e.t, e.t.Context()
	if v := e.create(createReq("round", 5000, nil)); v.GetCapacityBytes() != 8192 || e.get("round").Spec.Size.Value() != 8192 {
		t.Errorf("5000 bytes gave %d, want 8192", v.GetCapacityBytes())
	}
	req := createReq("limited", 5000, nil)
	req.CapacityRange.LimitBytes = 6000
	_, err := e.ctl.CreateVolume(ctx, req)
	expectCode(t, err, codes.OutOfRange, "limit_bytes 6000")
	req = createReq("default-size", 0, nil)
	req.CapacityRange = nil
	if v := e.create(req); v.GetCapacityBytes() != DefaultSize {
		t.Errorf("no capacity range gave %d, want %d", v.GetCapacityBytes(), DefaultSize)
	}
}

func testPreferredNode(e *env) {
	req := createReq("wffc", 4096, map[string]string{"replicas": "1", "nodeSelector": "group=abc"})
	req.AccessibilityRequirements = &csipb.TopologyRequirement{
		Requisite: []*csipb.Topology{{Segments: map[string]string{TopologyKeyNode: "node-a"}}},
		Preferred: []*csipb.Topology{
			{Segments: map[string]string{"topology.kubernetes.io/zone": "z1"}},
			{Segments: map[string]string{TopologyKeyNode: "node-c"}},
			{Segments: map[string]string{TopologyKeyNode: "node-a"}},
		},
	}
	e.create(req)
	if got := e.get("wffc").Spec.Placement.PreferredNode; got != "node-c" {
		e.t.Errorf("preferredNode %q, want node-c", got)
	}
	// The reconciler puts the one replica there, although node-a sorts first.
	e.waitFor("wffc", "the replica on node-c", func(qv *v1alpha1.QuorumVolume) bool {
		return len(qv.Status.Replicas) == 1 && qv.Status.Replicas[0].Node == "node-c"
	})
}

func testPublishSingleNode(e *env) {
	t, ctx := e.t, e.t.Context()
	v := e.create(createReq("single", 4096, nil))
	id, c := v.GetVolumeId(), mountCap(snw, "")
	for range 2 {
		resp, err := e.publish(id, "node-a", c)
		if err != nil || resp.GetPublishContext()[PublishContextEpoch] != "1" {
			t.Fatalf("publish to node-a: %v, %v; want epoch 1 (twice: idempotent)", resp, err)
		}
	}
	_, err := e.publish(id, "node-b", c)
	expectCode(t, err, codes.FailedPrecondition, "node-a")
	_, err = e.publish(id, "no-such-node", c)
	expectCode(t, err, codes.NotFound, "no-such-node")
	_, err = e.publish("no-such-volume", "node-a", c)
	expectCode(t, err, codes.NotFound, "no-such-volume")
	_, err = e.publish(id, "node-b", mountCap(mnmw, ""))
	expectCode(t, err, codes.InvalidArgument, "Block")

	got, err := e.ctl.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{VolumeId: id})
	if err != nil || !slices.Equal(got.GetStatus().GetPublishedNodeIds(), []string{"node-a"}) || got.GetVolume().GetVolumeId() != id {
		t.Errorf("ControllerGetVolume: %v, %v; want published on node-a", got, err)
	}

	// Unpublish is idempotent, and the next holder gets a newer epoch.
	e.unpublish(id, "node-a")
	e.unpublish(id, "node-a")
	e.unpublish(id, "node-c")
	e.unpublish("no-such-volume", "node-a")
	resp, err := e.publish(id, "node-b", c)
	if err != nil || resp.GetPublishContext()[PublishContextEpoch] != "2" {
		t.Fatalf("publish to node-b after unpublish: %v, %v; want epoch 2", resp, err)
	}
	// An empty node_id unpublishes from every node.
	e.unpublish(id, "")
	if qv := e.get(id); len(qv.Status.Attachments) != 0 || qv.Status.Epoch != 2 {
		t.Errorf("after unpublish from all: attachments %v, epoch %d; want none, 2", qv.Status.Attachments, qv.Status.Epoch)
	}
}

// testPublishMultiNode walks a live migration's steps on an RWX Block
// volume: each publish or unpublish, then the attachments it leaves.
// The second publish is the Standby target with a newer epoch; a third is
// refused; unpublishing the source confirms, the target rolls back.
func testPublishMultiNode(e *env) {
	t := e.t
	v := e.create(createReq("migrate", 4096, nil, blockCap(mnmw)))
	id, c := v.GetVolumeId(), blockCap(mnmw)
	type att = v1alpha1.Attachment
	active, standby := v1alpha1.AttachmentActive, v1alpha1.AttachmentStandby
	steps := []struct {
		name      string
		publish   string // the node to publish to, or
		unpublish string // the node to unpublish from
		code      codes.Code
		epoch     string // the publish context's
		standby   bool
		want      []att // the attachments after the step
	}{
		{name: "source", publish: "node-a", epoch: "1", want: []att{{Node: "node-a", Epoch: 1, Role: active}}},
		{name: "target", publish: "node-b", epoch: "2", standby: true,
			want: []att{{Node: "node-a", Epoch: 1, Role: active}, {Node: "node-b", Epoch: 2, Role: standby}}},
		{name: "target again", publish: "node-b", epoch: "2", standby: true,
			want: []att{{Node: "node-a", Epoch: 1, Role: active}, {Node: "node-b", Epoch: 2, Role: standby}}},
		{name: "source again", publish: "node-a", epoch: "1",
			want: []att{{Node: "node-a", Epoch: 1, Role: active}, {Node: "node-b", Epoch: 2, Role: standby}}},
		{name: "a third node", publish: "node-c", code: codes.FailedPrecondition,
			want: []att{{Node: "node-a", Epoch: 1, Role: active}, {Node: "node-b", Epoch: 2, Role: standby}}},
		{name: "rollback: the target goes", unpublish: "node-b", want: []att{{Node: "node-a", Epoch: 1, Role: active}}},
		{name: "a new target", publish: "node-c", epoch: "3", standby: true,
			want: []att{{Node: "node-a", Epoch: 1, Role: active}, {Node: "node-c", Epoch: 3, Role: standby}}},
		{name: "confirm: the source goes", unpublish: "node-a", want: []att{{Node: "node-c", Epoch: 3, Role: active}}},
		{name: "back to the old source", publish: "node-a", epoch: "4", standby: true,
			want: []att{{Node: "node-c", Epoch: 3, Role: active}, {Node: "node-a", Epoch: 4, Role: standby}}},
		{name: "confirm again", unpublish: "node-c", want: []att{{Node: "node-a", Epoch: 4, Role: active}}},
	}
	for _, st := range steps {
		if st.unpublish != "" {
			e.unpublish(id, st.unpublish)
		} else {
			resp, err := e.publish(id, st.publish, c)
			if st.code != codes.OK {
				expectCode(t, err, st.code, "two attachments")
			} else if err != nil {
				t.Fatalf("%s: publish to %s: %v", st.name, st.publish, err)
			} else if pc := resp.GetPublishContext(); pc[PublishContextEpoch] != st.epoch || (pc[PublishContextStandby] == "true") != st.standby {
				t.Errorf("%s: publish context %v, want epoch %s, standby %t", st.name, pc, st.epoch, st.standby)
			}
		}
		got := e.get(id).Status.Attachments
		if !slices.EqualFunc(got, st.want, func(a, b att) bool { return a.Node == b.Node && a.Epoch == b.Epoch && a.Role == b.Role }) {
			t.Errorf("%s: attachments %+v, want %+v", st.name, got, st.want)
		}
	}

	// A Filesystem volume stays single-node: multi-node access is refused
	// as invalid, a second single-node publish as a precondition.
	fs := e.create(createReq("migrate-fs", 4096, nil, mountCap(snw, ""))).GetVolumeId()
	if _, err := e.publish(fs, "node-a", mountCap(snw, "")); err != nil {
		t.Fatalf("publish the Filesystem volume: %v", err)
	}
	for _, tc := range []struct {
		c    *csipb.VolumeCapability
		code codes.Code
		text string
	}{
		{mountCap(mnmw, ""), codes.InvalidArgument, "Block"},
		{mountCap(snw, ""), codes.FailedPrecondition, "node-a"},
	} {
		_, err := e.publish(fs, "node-b", tc.c)
		expectCode(t, err, tc.code, tc.text)
	}
	e.unpublish(fs, "node-a")
}

func testExpand(e *env) {
	t, ctx := e.t, e.t.Context()
	v := e.create(createReq("grow", 1<<20, nil))
	expand := func(size int64, c *csipb.VolumeCapability) (*csipb.ControllerExpandVolumeResponse, error) {
		return e.ctl.ControllerExpandVolume(ctx, &csipb.ControllerExpandVolumeRequest{
			VolumeId: v.GetVolumeId(), CapacityRange: &csipb.CapacityRange{RequiredBytes: size}, VolumeCapability: c})
	}
	resp, err := expand(2<<20+1, mountCap(snw, ""))
	if err != nil || resp.GetCapacityBytes() != 2<<20+4096 || !resp.GetNodeExpansionRequired() {
		t.Fatalf("expand to 2 MiB + 1: %v, %v; want 2 MiB + 4096 and node expansion", resp, err)
	}
	if got := e.get(v.GetVolumeId()).Spec.Size.Value(); got != 2<<20+4096 {
		t.Errorf("spec.size %d after expand", got)
	}
	// Again, or smaller: nothing changes, volumes never shrink.
	for _, size := range []int64{2<<20 + 1, 4096} {
		resp, err = expand(size, blockCap(snw))
		if err != nil || resp.GetCapacityBytes() != 2<<20+4096 {
			t.Errorf("expand to %d: %v, %v; want the current 2 MiB + 4096", size, resp, err)
		}
	}
	// Offline only: a published volume does not grow until unpublished.
	publish := &csipb.ControllerPublishVolumeRequest{VolumeId: v.GetVolumeId(), NodeId: "node-a", VolumeCapability: mountCap(snw, "")}
	if _, err := e.ctl.ControllerPublishVolume(ctx, publish); err != nil {
		t.Fatal(err)
	}
	_, err = expand(3<<20, nil)
	expectCode(t, err, codes.FailedPrecondition, "published to node-a", "offline")
	if _, err := e.ctl.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: v.GetVolumeId(), NodeId: "node-a"}); err != nil {
		t.Fatal(err)
	}
	if resp, err = expand(3<<20, nil); err != nil || resp.GetCapacityBytes() != 3<<20 {
		t.Errorf("expand to 3 MiB once unpublished: %v, %v", resp, err)
	}
	_, err = expand(0, nil)
	expectCode(t, err, codes.InvalidArgument, "required_bytes")
	_, err = e.ctl.ControllerExpandVolume(ctx, &csipb.ControllerExpandVolumeRequest{VolumeId: "no-such-volume", CapacityRange: &csipb.CapacityRange{RequiredBytes: 4096}})
	expectCode(t, err, codes.NotFound)
}

func testListPagination(e *env) {
	t, ctx := e.t, e.t.Context()
	all, err := e.ctl.ListVolumes(ctx, &csipb.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if all.GetNextToken() != "" {
		t.Errorf("unpaged list has next_token %q", all.GetNextToken())
	}
	for i := range 3 {
		e.create(createReq("page-"+string(rune('a'+i)), 4096, nil))
	}
	var pages int
	var seen []string
	token := ""
	for {
		resp, err := e.ctl.ListVolumes(ctx, &csipb.ListVolumesRequest{MaxEntries: 2, StartingToken: token})
		if err != nil {
			t.Fatalf("page %d: %v", pages, err)
		}
		if len(resp.GetEntries()) > 2 {
			t.Errorf("page %d has %d entries, max 2", pages, len(resp.GetEntries()))
		}
		for _, en := range resp.GetEntries() {
			seen = append(seen, en.GetVolume().GetVolumeId())
			if en.GetStatus() == nil {
				t.Errorf("entry %s has no status", en.GetVolume().GetVolumeId())
			}
		}
		pages++
		if token = resp.GetNextToken(); token == "" {
			break
		}
	}
	want := len(all.GetEntries()) + 3
	if len(seen) != want || len(slices.Compact(slices.Sorted(slices.Values(seen)))) != want || pages != (want+1)/2 {
		t.Errorf("%d pages listed %v, want %d distinct volumes on %d pages", pages, seen, want, (want+1)/2)
	}
	for _, n := range []string{"page-a", "page-b", "page-c"} {
		if !slices.Contains(seen, n) {
			t.Errorf("%s not listed", n)
		}
	}
	_, err = e.ctl.ListVolumes(ctx, &csipb.ListVolumesRequest{StartingToken: "not-a-token"})
	expectCode(t, err, codes.Aborted, "starting_token")
	_, err = e.ctl.ListVolumes(ctx, &csipb.ListVolumesRequest{MaxEntries: -1})
	expectCode(t, err, codes.InvalidArgument, "max_entries")
}

// testHealth: three replicas on three nodes, reported Healthy and then
// one Faulty by the agents; the reconciler turns the volume Degraded,
// which ControllerGetVolumeHealth and ControllerListVolumeHealth report.
func testHealth(e *env) {
	t, ctx := e.t, e.t.Context()
	v := e.create(createReq("health", 4096, map[string]string{"nodeSelector": "group=abc"}))
	id := v.GetVolumeId()
	qv := e.waitFor(id, "three replicas placed", func(qv *v1alpha1.QuorumVolume) bool { return len(qv.Status.Replicas) == 3 })
	health := func() *csipb.VolumeHealth {
		t.Helper()
		resp, err := e.ctl.ControllerGetVolumeHealth(ctx, &csipb.ControllerGetVolumeHealthRequest{VolumeId: id})
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetVolumeHealth()
	}
	if h := health(); h.GetVolumeId() != id || len(h.GetHealthStatuses()) != 0 {
		t.Errorf("Pending volume health %v, want none adverse", h)
	}
	for _, r := range qv.Status.Replicas {
		e.report(id, r.Name, v1alpha1.ReplicaHealthy, "")
	}
	e.waitFor(id, "Ready", func(qv *v1alpha1.QuorumVolume) bool { return qv.Status.Phase == v1alpha1.VolumeReady })
	if h := health(); len(h.GetHealthStatuses()) != 0 {
		t.Errorf("Ready volume health %v, want none adverse", h)
	}
	bad := qv.Status.Replicas[1]
	e.report(id, bad.Name, v1alpha1.ReplicaFaulty, "read error at 4096")
	e.waitFor(id, "Degraded", func(qv *v1alpha1.QuorumVolume) bool { return qv.Status.Phase == v1alpha1.VolumeDegraded })
	h := health()
	if len(h.GetHealthStatuses()) != 1 {
		t.Fatalf("Degraded volume health %v, want one entry", h)
	}
	s := h.GetHealthStatuses()[0]
	if s.GetStatus() != csipb.VolumeHealthErrorType_DEGRADED || s.GetReason() != "Degraded" ||
		!strings.Contains(s.GetMessage(), "2/3 replicas healthy") || !strings.Contains(s.GetMessage(), bad.Name+" on "+bad.Node+": Faulty (read error at 4096)") {
		t.Errorf("health entry %v, want DEGRADED naming the faulty replica", s)
	}
	list, err := e.ctl.ControllerListVolumeHealth(ctx, &csipb.ControllerListVolumeHealthRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetEntries()) != 1 || list.GetEntries()[0].GetVolumeId() != id {
		t.Errorf("ControllerListVolumeHealth %v, want only %s", list, id)
	}

	// Two of three Faulty is below the vote threshold: writes fail.
	e.report(id, qv.Status.Replicas[2].Name, v1alpha1.ReplicaFaulty, "gone")
	e.waitFor(id, "Faulted", func(qv *v1alpha1.QuorumVolume) bool { return qv.Status.Phase == v1alpha1.VolumeFaulted })
	if s := health().GetHealthStatuses(); len(s) != 1 || s[0].GetStatus() != csipb.VolumeHealthErrorType_INACCESSIBLE || s[0].GetReason() != "Faulted" {
		t.Errorf("Faulted volume health %v, want INACCESSIBLE", s)
	}
}

func testDeletePublished(e *env) {
	t, ctx := e.t, e.t.Context()
	v := e.create(createReq("in-use", 4096, nil))
	id := v.GetVolumeId()
	if _, err := e.publish(id, "node-b", mountCap(snw, "")); err != nil {
		t.Fatal(err)
	}
	del := func() error {
		_, err := e.ctl.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id})
		return err
	}
	expectCode(t, del(), codes.FailedPrecondition, "published to node-b")
	e.unpublish(id, "node-b")
	for range 2 {
		if err := del(); err != nil {
			t.Fatalf("DeleteVolume after unpublish (twice: idempotent): %v", err)
		}
	}
	// Gone for the CO at once, while the finalizer may still hold it.
	_, err := e.ctl.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{VolumeId: id})
	expectCode(t, err, codes.NotFound)
	_, err = e.publish(id, "node-b", mountCap(snw, ""))
	expectCode(t, err, codes.NotFound)
	if err := e.c.Get(ctx, objectKey(id), &v1alpha1.QuorumVolume{}); err == nil {
		// Recreating the name while the old volume is still finalized is
		// retried by the CO.
		_, err := e.ctl.CreateVolume(ctx, createReq("in-use", 4096, nil))
		if c := status.Code(err); c != codes.Aborted && c != codes.OK {
			t.Errorf("CreateVolume while the old volume is being deleted: %v, want ABORTED (or OK once it is gone)", err)
		}
	}
	list, err := e.ctl.ListVolumes(ctx, &csipb.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, en := range list.GetEntries() {
		if en.GetVolume().GetVolumeId() == id && e.get(id).DeletionTimestamp != nil {
			t.Errorf("a volume being deleted is listed")
		}
	}
}

func testMissingFields(e *env) {
	ctx := e.t.Context()
	for _, tc := range []struct {
		call func() error
		want string
	}{
		{func() error { _, err := e.ctl.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{}); return err }, "volume_id"},
		{func() error { _, err := e.ctl.CreateVolume(ctx, &csipb.CreateVolumeRequest{}); return err }, "name"},
		{func() error {
			_, err := e.ctl.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{NodeId: "node-a", VolumeCapability: mountCap(snw, "")})
			return err
		}, "volume_id"},
		{func() error {
			_, err := e.ctl.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: "v", VolumeCapability: mountCap(snw, "")})
			return err
		}, "node_id"},
		{func() error {
			_, err := e.ctl.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: "v", NodeId: "node-a"})
			return err
		}, "volume_capability"},
		{func() error {
			_, err := e.ctl.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{NodeId: "node-a"})
			return err
		}, "volume_id"},
		{func() error {
			_, err := e.ctl.ValidateVolumeCapabilities(ctx, &csipb.ValidateVolumeCapabilitiesRequest{VolumeId: "v"})
			return err
		}, "volume_capabilities"},
		{func() error {
			_, err := e.ctl.ControllerExpandVolume(ctx, &csipb.ControllerExpandVolumeRequest{CapacityRange: &csipb.CapacityRange{RequiredBytes: 1}})
			return err
		}, "volume_id"},
		{func() error {
			_, err := e.ctl.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{})
			return err
		}, "volume_id"},
		{func() error {
			_, err := e.ctl.ControllerGetVolumeHealth(ctx, &csipb.ControllerGetVolumeHealthRequest{})
			return err
		}, "volume_id"},
	} {
		expectCode(e.t, tc.call(), codes.InvalidArgument, tc.want)
	}
	// Calls this service does not claim stay UNIMPLEMENTED.
	_, err := e.ctl.CreateSnapshot(ctx, &csipb.CreateSnapshotRequest{Name: "s", SourceVolumeId: "v"})
	expectCode(e.t, err, codes.Unimplemented)
}

func objectKey(name string) client.ObjectKey { return client.ObjectKey{Name: name} }
