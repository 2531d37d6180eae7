package csi

import (
	"errors"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/utils/ptr"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

func TestParseParams(t *testing.T) {
	for _, tc := range []struct {
		name    string
		params  map[string]string
		want    func(*volumeParams) bool
		wantErr string // the parameter the message must name; "" for success
	}{
		{name: "defaults", params: nil, want: func(p *volumeParams) bool {
			return p.spec.Replicas == 3 && *p.spec.VoteThreshold == 2 && p.spec.ReadPattern == v1alpha1.ReadPatternFIFO &&
				!p.spec.RewriteCorrupted && p.spec.Placement.SpreadKey == DefaultSpreadKey && p.spec.Placement.NodeSelector == nil && p.fsType == ""
		}},
		{name: "everything", params: map[string]string{
			"replicas": "5", "voteThreshold": "4", "readPattern": "quorum", "rewriteCorrupted": "true",
			"fsType": "xfs", "nodeSelector": "disk=ssd, example.com/pool=a", "topologySpreadKey": "topology.kubernetes.io/zone",
		}, want: func(p *volumeParams) bool {
			return p.spec.Replicas == 5 && *p.spec.VoteThreshold == 4 && p.spec.ReadPattern == v1alpha1.ReadPatternQuorum &&
				p.spec.RewriteCorrupted && p.fsType == "xfs" && len(p.spec.Placement.NodeSelector) == 2 &&
				p.spec.Placement.NodeSelector["example.com/pool"] == "a" && p.spec.Placement.SpreadKey == "topology.kubernetes.io/zone"
		}},
		{name: "one replica votes alone", params: map[string]string{"replicas": "1"}, want: func(p *volumeParams) bool {
			return p.spec.Replicas == 1 && *p.spec.VoteThreshold == 1
		}},
		{name: "sidecar parameters ignored", params: map[string]string{
			"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "default", "csi.storage.k8s.io/pv/name": "pvc-1",
		}, want: func(p *volumeParams) bool { return p.spec.Replicas == 3 }},
		{name: "replicas not a number", params: map[string]string{"replicas": "three"}, wantErr: "replicas"},
		{name: "replicas zero", params: map[string]string{"replicas": "0"}, wantErr: "replicas"},
		{name: "replicas above the maximum", params: map[string]string{"replicas": "8"}, wantErr: "replicas"},
		{name: "voteThreshold zero", params: map[string]string{"voteThreshold": "0"}, wantErr: "voteThreshold"},
		{name: "voteThreshold above replicas", params: map[string]string{"replicas": "2", "voteThreshold": "3"}, wantErr: "voteThreshold"},
		{name: "readPattern unknown", params: map[string]string{"readPattern": "random"}, wantErr: "readPattern"},
		{name: "rewriteCorrupted not a bool", params: map[string]string{"readPattern": "quorum", "rewriteCorrupted": "often"}, wantErr: "rewriteCorrupted"},
		{name: "rewriteCorrupted with fifo", params: map[string]string{"rewriteCorrupted": "true"}, wantErr: "rewriteCorrupted"},
		{name: "fsType unsupported", params: map[string]string{"fsType": "ntfs"}, wantErr: "fsType"},
		{name: "nodeSelector without =", params: map[string]string{"nodeSelector": "ssd"}, wantErr: "nodeSelector"},
		{name: "nodeSelector bad key", params: map[string]string{"nodeSelector": "bad key=x"}, wantErr: "nodeSelector"},
		{name: "nodeSelector bad value", params: map[string]string{"nodeSelector": "k=not ok"}, wantErr: "nodeSelector"},
		{name: "nodeSelector duplicate key", params: map[string]string{"nodeSelector": "k=a,k=b"}, wantErr: "nodeSelector"},
		{name: "nodeSelector empty", params: map[string]string{"nodeSelector": " , "}, wantErr: "nodeSelector"},
		{name: "topologySpreadKey not a label key", params: map[string]string{"topologySpreadKey": "-zone"}, wantErr: "topologySpreadKey"},
		{name: "unknown parameter", params: map[string]string{"dataLocality": "best-effort"}, wantErr: "dataLocality"},
		{name: "unknown parameter in another domain", params: map[string]string{"example.com/x": "1"}, wantErr: "example.com/x"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := parseParams(tc.params)
			if tc.wantErr != "" {
				if !errors.Is(err, errInvalidArgument) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want invalid argument naming %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tc.want(&p) {
				t.Errorf("parsed %+v (voteThreshold %d), not as expected", p, ptr.Deref(p.spec.VoteThreshold, -1))
			}
		})
	}
}

func TestVolumeSize(t *testing.T) {
	const gi = 1 << 30
	for _, tc := range []struct {
		name            string
		required, limit int64
		nilRange        bool
		want            int64
		wantErr         error
	}{
		{name: "no range", nilRange: true, want: DefaultSize},
		{name: "exact", required: 8192, want: 8192},
		{name: "rounded up", required: 5000, want: 8192},
		{name: "one byte", required: 1, want: BlockSize},
		{name: "rounded within limit", required: 5000, limit: 8192, want: 8192},
		{name: "rounded above limit", required: 5000, limit: 6000, wantErr: errOutOfRange},
		{name: "limit below required", required: 2 * gi, limit: gi, wantErr: errOutOfRange},
		{name: "only a limit above the default", limit: 2 * gi, want: DefaultSize},
		{name: "only a limit below the default, rounded down", limit: 10000, want: 8192},
		{name: "only a limit below a block", limit: 100, wantErr: errOutOfRange},
		{name: "negative", required: -1, wantErr: errInvalidArgument},
		{name: "overflow", required: 1<<63 - 1, wantErr: errOutOfRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &csipb.CapacityRange{RequiredBytes: tc.required, LimitBytes: tc.limit}
			if tc.nilRange {
				r = nil
			}
			got, err := volumeSize(r)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("size %d, error %v; want %v", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("size %d, error %v; want %d", got, err, tc.want)
			}
		})
	}
}

func blockCap(m csipb.VolumeCapability_AccessMode_Mode) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: m},
	}
}

func mountCap(m csipb.VolumeCapability_AccessMode_Mode, fsType string) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: m},
	}
}

func TestCheckCapability(t *testing.T) {
	type mode = csipb.VolumeCapability_AccessMode_Mode
	const (
		snw  = csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER
		snsw = csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
		snmw = csipb.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER
		snro = csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
		mnro = csipb.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY
		mnsw = csipb.VolumeCapability_AccessMode_MULTI_NODE_SINGLE_WRITER
		mnmw = csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER
	)
	for _, tc := range []struct {
		name   string
		cap    *csipb.VolumeCapability
		fsType string // the StorageClass parameter
		ok     bool
		multi  bool
	}{
		{name: "block RWO", cap: blockCap(snw), ok: true},
		{name: "block RWOP", cap: blockCap(snsw), ok: true},
		{name: "block single node multi writer", cap: blockCap(snmw), ok: true},
		{name: "block RWX for live migration", cap: blockCap(mnmw), ok: true, multi: true},
		{name: "mount RWO", cap: mountCap(snw, ""), ok: true},
		{name: "mount RWO ext4", cap: mountCap(snw, "ext4"), ok: true},
		{name: "mount RWOP xfs", cap: mountCap(snsw, "xfs"), fsType: "xfs", ok: true},
		{name: "mount fs_type unset, parameter set", cap: mountCap(snmw, ""), fsType: "xfs", ok: true},
		{name: "mount RWX refused", cap: mountCap(mnmw, "ext4")},
		{name: "mount fs_type unsupported", cap: mountCap(snw, "btrfs")},
		{name: "mount fs_type disagrees with parameter", cap: mountCap(snw, "ext4"), fsType: "xfs"},
		{name: "read-only single node", cap: blockCap(snro)},
		{name: "read-only many nodes", cap: blockCap(mnro)},
		{name: "multi node single writer", cap: blockCap(mnsw)},
		{name: "mode missing", cap: &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}}}},
		{name: "access type missing", cap: &csipb.VolumeCapability{AccessMode: &csipb.VolumeCapability_AccessMode{Mode: snw}}},
		{name: "nil", cap: nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkCapability(tc.cap, tc.fsType)
			if tc.ok != (err == nil) {
				t.Fatalf("error %v, want ok %v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, errInvalidArgument) {
				t.Errorf("error %v does not wrap errInvalidArgument", err)
			}
			if got := multiNode(tc.cap); tc.ok && got != tc.multi {
				t.Errorf("multiNode %v, want %v", got, tc.multi)
			}
		})
	}
	if err := checkCapabilities(nil, ""); !errors.Is(err, errInvalidArgument) {
		t.Errorf("no capabilities: %v, want invalid argument", err)
	}
	if err := checkCapabilities([]*csipb.VolumeCapability{blockCap(snw), mountCap(mnmw, "")}, ""); err == nil || !strings.Contains(err.Error(), "volume_capabilities[1]") {
		t.Errorf("second capability bad: %v, want an error naming volume_capabilities[1]", err)
	}
}

func TestVolumeID(t *testing.T) {
	for _, tc := range []struct {
		name, want string // want "" means hashed
		prefix     string // for hashed IDs, the readable part
	}{
		{name: "pvc-3f1c2a9e-7d2b-4c1e-9a4b-0c2d1e3f4a5b", want: "pvc-3f1c2a9e-7d2b-4c1e-9a4b-0c2d1e3f4a5b"},
		{name: "vol", want: "vol"},
		{name: "My_Volume", prefix: "my-volume-"},
		{name: "sanity-controller-create-twice-8F2A1C3B-1E2D3C4B", prefix: "sanity-controller-create-twice-8f2a1c3b-1e2d3c-"},
		{name: "-leading", prefix: "leading-"},
		{name: "___", prefix: "vol-"},
		{name: "日本", prefix: "vol-"},
		{name: strings.Repeat("a", 64), prefix: strings.Repeat("a", hashedPrefixLen) + "-"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := volumeID(tc.name)
			if errs := validation.IsDNS1123Label(id); len(errs) > 0 {
				t.Fatalf("volumeID(%q) = %q, not a DNS-1123 label: %v", tc.name, id, errs)
			}
			if id != volumeID(tc.name) {
				t.Fatalf("volumeID(%q) not deterministic", tc.name)
			}
			if tc.want != "" {
				if id != tc.want {
					t.Errorf("volumeID(%q) = %q, want it unchanged", tc.name, id)
				}
				return
			}
			if !strings.HasPrefix(id, tc.prefix) || len(id) != len(tc.prefix)+16 {
				t.Errorf("volumeID(%q) = %q, want %q and 16 hex digits", tc.name, id, tc.prefix)
			}
		})
	}
	if volumeID("A") == volumeID("a-") || volumeID("Vol") == volumeID("vOL") {
		t.Errorf("names that sanitize alike share an ID")
	}
}
