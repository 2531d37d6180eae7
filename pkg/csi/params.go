package csi

import (
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// StorageClass parameters CreateVolume understands.
const (
	ParamReplicas          = "replicas"
	ParamVoteThreshold     = "voteThreshold"
	ParamReadPattern       = "readPattern"
	ParamRewriteCorrupted  = "rewriteCorrupted"
	ParamFSType            = "fsType"
	ParamNodeSelector      = "nodeSelector"
	ParamTopologySpreadKey = "topologySpreadKey"

	// sidecarParamPrefix marks the parameters the kubernetes-csi sidecars
	// add themselves (PVC name and namespace with --extra-create-metadata,
	// secrets' names); they are not ours to judge.
	sidecarParamPrefix = "csi.storage.k8s.io/"

	// DefaultReplicas is the replica count when the StorageClass gives
	// none: three copies survive the loss of one node with a majority
	// left to vote.
	DefaultReplicas = 3
	// DefaultSpreadKey puts every replica on its own node.
	DefaultSpreadKey = "kubernetes.io/hostname"

	// BlockSize is the granularity of volume sizes: replicas are read
	// and written with O_DIRECT in 4 KiB blocks.
	BlockSize = 4096
	// DefaultSize is the size of a volume whose request gives no
	// capacity range.
	DefaultSize = 1 << 30
)

// FSTypes are the filesystems the node service may make on a Filesystem
// volume (the ones it is tested with).
var FSTypes = []string{"ext4", "xfs"}

// volumeParams is what a StorageClass's parameters say about a volume.
type volumeParams struct {
	spec   v1alpha1.QuorumVolumeSpec // everything but size and preferredNode
	fsType string                    // "" leaves the choice to the node
}

// parseParams validates StorageClass parameters and returns the spec they
// describe, with every default made explicit so that two specs compare
// equal exactly when they mean the same volume. Errors wrap
// errInvalidArgument and name the parameter.
func parseParams(params map[string]string) (volumeParams, error) {
	p := volumeParams{spec: v1alpha1.QuorumVolumeSpec{
		Replicas:    DefaultReplicas,
		ReadPattern: v1alpha1.ReadPatternFIFO,
		Placement:   v1alpha1.Placement{SpreadKey: DefaultSpreadKey},
	}}
	bad := func(name, format string, args ...any) error {
		return fmt.Errorf("%w: parameter %s=%q: %s", errInvalidArgument, name, params[name], fmt.Sprintf(format, args...))
	}
	// Sorted, so that a request with several mistakes always reports the
	// same one.
	for _, name := range slices.Sorted(maps.Keys(params)) {
		value := params[name]
		switch name {
		case ParamReplicas:
			n, err := strconv.ParseInt(value, 10, 32)
			if err != nil || n < 1 || n > v1alpha1.MaxReplicas {
				return p, bad(name, "want a whole number from 1 to %d", v1alpha1.MaxReplicas)
			}
			p.spec.Replicas = int32(n)
		case ParamVoteThreshold:
			n, err := strconv.ParseInt(value, 10, 32)
			if err != nil || n < 1 {
				return p, bad(name, "want a whole number from 1 to replicas")
			}
			t := int32(n)
			p.spec.VoteThreshold = &t
		case ParamReadPattern:
			switch rp := v1alpha1.ReadPattern(value); rp {
			case v1alpha1.ReadPatternFIFO, v1alpha1.ReadPatternQuorum:
				p.spec.ReadPattern = rp
			default:
				return p, bad(name, "want %s or %s", v1alpha1.ReadPatternFIFO, v1alpha1.ReadPatternQuorum)
			}
		case ParamRewriteCorrupted:
			b, err := strconv.ParseBool(value)
			if err != nil {
				return p, bad(name, "want true or false")
			}
			p.spec.RewriteCorrupted = b
		case ParamFSType:
			if !slices.Contains(FSTypes, value) {
				return p, bad(name, "want one of %s", strings.Join(FSTypes, ", "))
			}
			p.fsType = value
		case ParamNodeSelector:
			sel, err := parseSelector(value)
			if err != nil {
				return p, bad(name, "%v", err)
			}
			p.spec.Placement.NodeSelector = sel
		case ParamTopologySpreadKey:
			if errs := validation.IsQualifiedName(value); len(errs) > 0 {
				return p, bad(name, "not a label key: %s", strings.Join(errs, "; "))
			}
			p.spec.Placement.SpreadKey = value
		default:
			if strings.HasPrefix(name, sidecarParamPrefix) {
				continue
			}
			return p, fmt.Errorf("%w: unknown parameter %q (known: %s)", errInvalidArgument, name,
				strings.Join([]string{ParamReplicas, ParamVoteThreshold, ParamReadPattern, ParamRewriteCorrupted,
					ParamFSType, ParamNodeSelector, ParamTopologySpreadKey}, ", "))
		}
	}
	// The rules across parameters, checked here as the CRD's CEL rules
	// would, so that the message names the parameter the user wrote.
	if t := p.spec.VoteThreshold; t != nil && *t > p.spec.Replicas {
		return p, bad(ParamVoteThreshold, "exceeds replicas (%d)", p.spec.Replicas)
	}
	if p.spec.RewriteCorrupted && p.spec.ReadPattern != v1alpha1.ReadPatternQuorum {
		return p, bad(ParamRewriteCorrupted, "needs readPattern quorum: fifo reads do not vote, so there is no winner to rewrite with")
	}
	// An explicit threshold equal to the default is the same volume as
	// none; storing the effective one lets retries compare specs plainly.
	t := p.spec.EffectiveVoteThreshold()
	p.spec.VoteThreshold = &t
	return p, nil
}

// parseSelector parses "k=v,k2=v2" into labels, each key and value
// checked as the API server checks node labels.
func parseSelector(s string) (map[string]string, error) {
	sel := map[string]string{}
	for pair := range strings.SplitSeq(s, ",") {
		pair = strings.TrimSpace(pair)
		if pair == "" {
			continue
		}
		k, v, ok := strings.Cut(pair, "=")
		if !ok {
			return nil, fmt.Errorf("%q is not key=value", pair)
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			return nil, fmt.Errorf("label key %q: %s", k, strings.Join(errs, "; "))
		}
		if errs := validation.IsValidLabelValue(v); len(errs) > 0 {
			return nil, fmt.Errorf("label value %q: %s", v, strings.Join(errs, "; "))
		}
		if _, dup := sel[k]; dup {
			return nil, fmt.Errorf("label key %q given twice", k)
		}
		sel[k] = v
	}
	if len(sel) == 0 {
		return nil, fmt.Errorf("no key=value pairs")
	}
	return sel, nil
}

// volumeSize turns a capacity range into a size in bytes: required_bytes
// rounded up to BlockSize, and DefaultSize (capped by limit_bytes) when
// nothing is required. A range that no multiple of BlockSize satisfies
// is errOutOfRange, a negative bound errInvalidArgument.
func volumeSize(r *csipb.CapacityRange) (int64, error) {
	required, limit := r.GetRequiredBytes(), r.GetLimitBytes()
	if required < 0 || limit < 0 {
		return 0, fmt.Errorf("%w: capacity_range: required_bytes %d and limit_bytes %d must not be negative", errInvalidArgument, required, limit)
	}
	if required == 0 {
		size := int64(DefaultSize)
		if limit > 0 && limit < size {
			size = limit / BlockSize * BlockSize
		}
		if size == 0 {
			return 0, fmt.Errorf("%w: capacity_range: limit_bytes %d is below the block size %d", errOutOfRange, limit, BlockSize)
		}
		return size, nil
	}
	if required > math.MaxInt64-BlockSize+1 {
		return 0, fmt.Errorf("%w: capacity_range: required_bytes %d is too large", errOutOfRange, required)
	}
	size := (required + BlockSize - 1) / BlockSize * BlockSize
	if limit > 0 && size > limit {
		return 0, fmt.Errorf("%w: capacity_range: required_bytes %d rounded up to the block size %d is %d, above limit_bytes %d",
			errOutOfRange, required, BlockSize, size, limit)
	}
	return size, nil
}

// fitsRange says whether an existing volume of size bytes satisfies a
// capacity range (for CreateVolume retries).
func fitsRange(size int64, r *csipb.CapacityRange) bool {
	return size >= r.GetRequiredBytes() && (r.GetLimitBytes() == 0 || size <= r.GetLimitBytes())
}

// checkCapabilities says why the volume capabilities cannot be served, or
// nil when they can. Supported: Block or Filesystem (with an fs_type of
// FSTypes or none), accessed by one node (SINGLE_NODE_WRITER,
// SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER); Block also
// MULTI_NODE_MULTI_WRITER, which KubeVirt needs for live migration: the
// epochs fence the source once the target writes (pkg/nbd's doc), which
// keeps one writer per block device but would corrupt a filesystem
// mounted on two nodes. fsType, the StorageClass parameter, must agree
// with a capability's fs_type when both are set.
func checkCapabilities(caps []*csipb.VolumeCapability, fsType string) error {
	if len(caps) == 0 {
		return fmt.Errorf("%w: volume_capabilities missing", errInvalidArgument)
	}
	for i, c := range caps {
		if err := checkCapability(c, fsType); err != nil {
			return fmt.Errorf("volume_capabilities[%d]: %w", i, err)
		}
	}
	return nil
}

func checkCapability(c *csipb.VolumeCapability, fsType string) error {
	if c == nil {
		return fmt.Errorf("%w: capability missing", errInvalidArgument)
	}
	block := false
	switch t := c.GetAccessType().(type) {
	case *csipb.VolumeCapability_Block:
		block = true
	case *csipb.VolumeCapability_Mount:
		fs := t.Mount.GetFsType()
		if fs != "" && !slices.Contains(FSTypes, fs) {
			return fmt.Errorf("%w: fs_type %q not supported (want one of %s)", errInvalidArgument, fs, strings.Join(FSTypes, ", "))
		}
		if fs != "" && fsType != "" && fs != fsType {
			return fmt.Errorf("%w: fs_type %q disagrees with parameter %s=%q", errInvalidArgument, fs, ParamFSType, fsType)
		}
	default:
		return fmt.Errorf("%w: access_type missing: want block or mount", errInvalidArgument)
	}
	mode := c.GetAccessMode().GetMode()
	switch mode {
	case csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csipb.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
		return nil
	case csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER:
		if block {
			return nil
		}
		return fmt.Errorf("%w: access mode %s needs Block access: a filesystem mounted on two nodes would be corrupted", errInvalidArgument, mode)
	case csipb.VolumeCapability_AccessMode_UNKNOWN:
		return fmt.Errorf("%w: access_mode missing", errInvalidArgument)
	}
	return fmt.Errorf("%w: access mode %s not supported (want SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER, or MULTI_NODE_MULTI_WRITER with Block)", errInvalidArgument, mode)
}

// multiNode says whether a capability lets several nodes attach the
// volume at once (which contract.Attach allows for two). Of the
// MULTI_NODE_* modes only MULTI_NODE_MULTI_WRITER passes checkCapability.
func multiNode(c *csipb.VolumeCapability) bool {
	return c.GetAccessMode().GetMode() == csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER
}

// isBlock says whether a capability asks for Block access.
func isBlock(c *csipb.VolumeCapability) bool {
	return c.GetBlock() != nil
}
