package v1alpha1_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/quorum-csi/quorum-csi/internal/kubetest"
	"github.com/quorum-csi/quorum-csi/internal/qvtest"
	"github.com/quorum-csi/quorum-csi/pkg/apis/quorum/v1alpha1"
)

// TestAgainstAPIServer installs the generated CRD into a real API server
// and checks that the server itself defaults QuorumVolumes, rejects
// invalid ones with a message naming the problem, and prints the columns.
// One server for all subtests: starting one takes seconds.
func TestAgainstAPIServer(t *testing.T) {
	srv := kubetest.Start(t)
	c := installCRD(t, srv)

	t.Run("defaults", func(t *testing.T) { testDefaults(t, c) })
	t.Run("invalid create", func(t *testing.T) { testInvalidCreate(t, c) })
	t.Run("update", func(t *testing.T) { testUpdate(t, c) })
	t.Run("status", func(t *testing.T) { testStatus(t, c) })
	t.Run("kubectl get qv", func(t *testing.T) { testPrinterColumns(t, c, srv) })
	t.Run("kubectl apply", func(t *testing.T) { testKubectlApply(t, srv) })
}

// installCRD creates the CRD from config/crd, the file `make generate`
// writes and the chart ships, and waits until QuorumVolumes are served.
func installCRD(t *testing.T, srv *kubetest.Server) client.Client {
	t.Helper()
	c, err := client.New(srv.Config, client.Options{Scheme: qvtest.Scheme(t)})
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	qvtest.InstallCRD(t, c)
	return c
}

func newQV(name string, mutate ...func(*v1alpha1.QuorumVolume)) *v1alpha1.QuorumVolume {
	qv := &v1alpha1.QuorumVolume{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       v1alpha1.QuorumVolumeSpec{Size: resource.MustParse("1Gi"), Replicas: 3},
	}
	for _, m := range mutate {
		m(qv)
	}
	return qv
}

func ptr[T any](v T) *T { return &v }

func testDefaults(t *testing.T, c client.Client) {
	ctx := t.Context()
	if err := c.Create(ctx, newQV("defaults")); err != nil {
		t.Fatalf("create a minimal QuorumVolume: %v", err)
	}
	got := &v1alpha1.QuorumVolume{}
	if err := c.Get(ctx, client.ObjectKey{Name: "defaults"}, got); err != nil {
		t.Fatal(err)
	}
	if got.Spec.ReadPattern != v1alpha1.ReadPatternFIFO {
		t.Errorf("readPattern %q, want the default %q", got.Spec.ReadPattern, v1alpha1.ReadPatternFIFO)
	}
	if got.Spec.Placement.SpreadKey != "kubernetes.io/hostname" {
		t.Errorf("placement.spreadKey %q, want the default kubernetes.io/hostname", got.Spec.Placement.SpreadKey)
	}
	if got.Spec.VoteThreshold != nil {
		t.Errorf("voteThreshold %d stored; unset should stay unset (majority)", *got.Spec.VoteThreshold)
	}
	if th := got.Spec.EffectiveVoteThreshold(); th != 2 {
		t.Errorf("effective voteThreshold of 3 replicas %d, want 2", th)
	}
	if got.Spec.Size.Cmp(resource.MustParse("1Gi")) != 0 {
		t.Errorf("size %s, want 1Gi", got.Spec.Size.String())
	}

	full := newQV("full", func(qv *v1alpha1.QuorumVolume) {
		qv.Spec.Replicas = 5
		qv.Spec.VoteThreshold = ptr(int32(5))
		qv.Spec.ReadPattern = v1alpha1.ReadPatternQuorum
		qv.Spec.RewriteCorrupted = true
		qv.Spec.Placement = v1alpha1.Placement{
			NodeSelector:  map[string]string{"storage": "fast"},
			SpreadKey:     "topology.kubernetes.io/zone",
			PreferredNode: "node-a",
		}
	})
	want := full.Spec.DeepCopy()
	if err := c.Create(ctx, full); err != nil {
		t.Fatalf("create a QuorumVolume with every field set: %v", err)
	}
	if err := c.Get(ctx, client.ObjectKey{Name: "full"}, full); err != nil {
		t.Fatal(err)
	}
	if !equality.Semantic.DeepEqual(full.Spec, *want) {
		t.Errorf("spec read back as\n%+v\nwant\n%+v", full.Spec, *want)
	}
}

func testInvalidCreate(t *testing.T, c client.Client) {
	tests := []struct {
		name   string
		mutate func(*v1alpha1.QuorumVolume)
		want   string
	}{
		{"voteThreshold above replicas", func(qv *v1alpha1.QuorumVolume) { qv.Spec.VoteThreshold = ptr(int32(4)) }, "voteThreshold must not exceed replicas"},
		{"voteThreshold 0", func(qv *v1alpha1.QuorumVolume) { qv.Spec.VoteThreshold = ptr(int32(0)) }, "spec.voteThreshold in body should be greater than or equal to 1"},
		{"replicas 0", func(qv *v1alpha1.QuorumVolume) { qv.Spec.Replicas = 0 }, "spec.replicas in body should be greater than or equal to 1"},
		{"replicas above the maximum", func(qv *v1alpha1.QuorumVolume) { qv.Spec.Replicas = v1alpha1.MaxReplicas + 1 }, "spec.replicas in body should be less than or equal to 7"},
		{"unknown readPattern", func(qv *v1alpha1.QuorumVolume) { qv.Spec.ReadPattern = "random" }, `spec.readPattern: Unsupported value: "random": supported values: "fifo", "quorum"`},
		{"rewriteCorrupted with fifo", func(qv *v1alpha1.QuorumVolume) { qv.Spec.RewriteCorrupted = true }, "rewriteCorrupted needs readPattern quorum"},
		{"size 0", func(qv *v1alpha1.QuorumVolume) { qv.Spec.Size = resource.MustParse("0") }, "size must be greater than zero"},
		{"negative size", func(qv *v1alpha1.QuorumVolume) { qv.Spec.Size = resource.MustParse("-1Gi") }, "size must be greater than zero"},
		{"fractional size", func(qv *v1alpha1.QuorumVolume) { qv.Spec.Size = resource.MustParse("1500m") }, "size must be a whole number of bytes"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			qv := newQV(fmt.Sprintf("invalid-%d", i), tt.mutate)
			checkInvalid(t, c.Create(t.Context(), qv), tt.want)
		})
	}
}

func testUpdate(t *testing.T, c client.Client) {
	tests := []struct {
		name   string
		mutate func(*v1alpha1.QuorumVolume)
		want   string // "" when the update is allowed
	}{
		{"size grows", func(qv *v1alpha1.QuorumVolume) { qv.Spec.Size = resource.MustParse("2Gi") }, ""},
		{"same size written differently", func(qv *v1alpha1.QuorumVolume) { qv.Spec.Size = resource.MustParse("1024Mi") }, ""},
		{"size shrinks", func(qv *v1alpha1.QuorumVolume) { qv.Spec.Size = resource.MustParse("512Mi") }, "size cannot shrink"},
		{"readPattern changes", func(qv *v1alpha1.QuorumVolume) { qv.Spec.ReadPattern = v1alpha1.ReadPatternQuorum }, ""},
		{"nodeSelector changes", func(qv *v1alpha1.QuorumVolume) { qv.Spec.Placement.NodeSelector = map[string]string{"a": "b"} }, ""},
		{"voteThreshold set to the default it had", func(qv *v1alpha1.QuorumVolume) { qv.Spec.VoteThreshold = ptr(int32(2)) }, ""},
		{"voteThreshold changes", func(qv *v1alpha1.QuorumVolume) { qv.Spec.VoteThreshold = ptr(int32(3)) }, "the effective voteThreshold is immutable"},
		{"replicas change", func(qv *v1alpha1.QuorumVolume) { qv.Spec.Replicas = 5 }, "spec.replicas: Invalid value: 5: replicas is immutable"},
		{"spreadKey changes", func(qv *v1alpha1.QuorumVolume) { qv.Spec.Placement.SpreadKey = "topology.kubernetes.io/zone" }, "placement.spreadKey is immutable"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := t.Context()
			qv := newQV(fmt.Sprintf("update-%d", i))
			if err := c.Create(ctx, qv); err != nil {
				t.Fatalf("create: %v", err)
			}
			tt.mutate(qv)
			err := c.Update(ctx, qv)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("update refused: %v", err)
				}
				return
			}
			checkInvalid(t, err, tt.want)
		})
	}
}

func testStatus(t *testing.T, c client.Client) {
	ctx := t.Context()
	qv := newQV("status")
	if err := c.Create(ctx, qv); err != nil {
		t.Fatalf("create: %v", err)
	}
	qv.Status.Epoch = 2
	qv.Status.Attachments = []v1alpha1.Attachment{{Node: "node-a", Epoch: 2}}
	if err := c.Status().Update(ctx, qv); err != nil {
		t.Fatalf("status update: %v", err)
	}
	tests := []struct {
		name   string
		mutate func(*v1alpha1.QuorumVolumeStatus)
		want   string
	}{
		{"epoch goes back", func(s *v1alpha1.QuorumVolumeStatus) { s.Epoch = 1; s.Attachments[0].Epoch = 1 }, "status.epoch never decreases"},
		{"attachment beyond epoch", func(s *v1alpha1.QuorumVolumeStatus) { s.Attachments[0].Epoch = 3 }, "an attachment's epoch must not exceed status.epoch"},
		{"three attachments", func(s *v1alpha1.QuorumVolumeStatus) {
			s.Epoch = 4
			s.Attachments = append(s.Attachments, v1alpha1.Attachment{Node: "node-b", Epoch: 3}, v1alpha1.Attachment{Node: "node-c", Epoch: 4})
		}, "status.attachments: Too many: 3: must have at most 2 items"},
		{"two Active attachments", func(s *v1alpha1.QuorumVolumeStatus) {
			s.Epoch = 3
			s.Attachments = append(s.Attachments, v1alpha1.Attachment{Node: "node-b", Epoch: 3, Role: v1alpha1.AttachmentActive})
		}, "exactly one attachment is Active"},
		{"only a Standby attachment", func(s *v1alpha1.QuorumVolumeStatus) { s.Attachments[0].Role = v1alpha1.AttachmentStandby }, "exactly one attachment is Active"},
		{"Standby older than Active", func(s *v1alpha1.QuorumVolumeStatus) {
			s.Attachments = append(s.Attachments, v1alpha1.Attachment{Node: "node-b", Epoch: 1, Role: v1alpha1.AttachmentStandby})
		}, "a Standby attachment's epoch must be newer than the Active one's"},
		{"unknown role", func(s *v1alpha1.QuorumVolumeStatus) { s.Attachments[0].Role = "Primary" }, `status.attachments[0].role: Unsupported value: "Primary"`},
		{"unknown phase", func(s *v1alpha1.QuorumVolumeStatus) { s.Phase = "Happy" }, `status.phase: Unsupported value: "Happy"`},
		{"unknown replica state", func(s *v1alpha1.QuorumVolumeStatus) {
			s.Replicas = []v1alpha1.ReplicaStatus{{Name: "r0", State: "Fine"}}
		}, `status.replicas[0].state: Unsupported value: "Fine"`},
		{"resync beyond 100%", func(s *v1alpha1.QuorumVolumeStatus) {
			s.Replicas = []v1alpha1.ReplicaStatus{{Name: "r0", State: v1alpha1.ReplicaResyncing, ResyncPercent: ptr(int32(101))}}
		}, "status.replicas[0].resyncPercent: Invalid value: 101: replicas[0].resyncPercent in body should be less than or equal to 100"},
		{"volume resync beyond 100%", func(s *v1alpha1.QuorumVolumeStatus) { s.ResyncPercent = ptr(int32(101)) },
			"status.resyncPercent: Invalid value: 101: resyncPercent in body should be less than or equal to 100"},
		{"negative volume resync", func(s *v1alpha1.QuorumVolumeStatus) { s.ResyncPercent = ptr(int32(-1)) },
			"status.resyncPercent: Invalid value: -1: resyncPercent in body should be greater than or equal to 0"},
		{"negative engine epoch", func(s *v1alpha1.QuorumVolumeStatus) {
			s.Replicas = []v1alpha1.ReplicaStatus{{Name: "r0", State: v1alpha1.ReplicaResyncing, OutOfSyncBytes: 4096, EngineEpoch: -1}}
		}, "status.replicas[0].engineEpoch: Invalid value: -1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bad := qv.DeepCopy()
			tt.mutate(&bad.Status)
			checkInvalid(t, c.Status().Update(t.Context(), bad), tt.want)
		})
	}
	// Detaching keeps the epoch, so the next attachment gets a new one.
	qv.Status.Attachments = nil
	if err := c.Status().Update(ctx, qv); err != nil {
		t.Fatalf("detach: %v", err)
	}
}

func testPrinterColumns(t *testing.T, c client.Client, srv *kubetest.Server) {
	ctx := t.Context()
	qv := newQV("printed", func(qv *v1alpha1.QuorumVolume) { qv.Spec.ReadPattern = v1alpha1.ReadPatternQuorum })
	if err := c.Create(ctx, qv); err != nil {
		t.Fatalf("create: %v", err)
	}
	qv.Status = v1alpha1.QuorumVolumeStatus{
		Phase: v1alpha1.VolumeDegraded,
		Replicas: []v1alpha1.ReplicaStatus{
			{Name: "r0", Node: "node-a", State: v1alpha1.ReplicaHealthy},
			{Name: "r1", Node: "node-b", State: v1alpha1.ReplicaHealthy},
			{Name: "r2", Node: "node-c", State: v1alpha1.ReplicaResyncing, ResyncPercent: ptr(int32(40)), OutOfSyncBytes: 1 << 20, EngineEpoch: 1},
		},
		ResyncPercent: ptr(int32(40)),
		Epoch:         2,
		Attachments: []v1alpha1.Attachment{
			{Node: "node-a", Epoch: 1, Role: v1alpha1.AttachmentActive},
			{Node: "node-b", Epoch: 2, Role: v1alpha1.AttachmentStandby},
		},
	}
	qv.Status.Ready = qv.ReadySummary()
	if err := c.Status().Update(ctx, qv); err != nil {
		t.Fatalf("status update: %v", err)
	}

	out, err := srv.Kubectl(t, "get", "qv", "printed")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("kubectl get qv printed %d lines, want header and one row:\n%s", len(lines), out)
	}
	wantHeader := []string{"NAME", "SIZE", "READY", "RESYNC", "PATTERN", "ACTIVE", "STANDBY", "PHASE", "AGE"}
	if got := strings.Fields(lines[0]); strings.Join(got, " ") != strings.Join(wantHeader, " ") {
		t.Errorf("header %q, want %q", got, wantHeader)
	}
	row := strings.Fields(lines[1])
	wantRow := []string{"printed", "1Gi", "2/3", "40", "quorum", "node-a", "node-b", "Degraded"}
	if len(row) != len(wantHeader) || strings.Join(row[:len(wantRow)], " ") != strings.Join(wantRow, " ") {
		t.Errorf("row %q, want %q followed by the age", row, wantRow)
	}
	// The short name and the category both reach the resource.
	for _, args := range [][]string{{"get", "quorumvolumes", "printed", "-o", "name"}, {"get", "quorum", "-o", "name"}} {
		if out, err := srv.Kubectl(t, args...); err != nil || !strings.Contains(out, "quorumvolume.quorum.csi.dev/printed") {
			t.Errorf("kubectl %s printed %q, %v", strings.Join(args, " "), out, err)
		}
	}
}

// testKubectlApply is the path a user takes: YAML through kubectl, where
// the size may be a plain integer and a refusal must read clearly.
func testKubectlApply(t *testing.T, srv *kubetest.Server) {
	tests := []struct {
		name   string
		object string // applying to the same object again is an update
		spec   string
		want   string // "" when kubectl apply succeeds
	}{
		{"size as an integer", "applied", `{size: 1073741824, replicas: 3}`, ""},
		{"size as an integer shrinks", "applied", `{size: 1073741823, replicas: 3}`, "size cannot shrink"},
		{"size as an integer grows", "applied", `{size: 2147483648, replicas: 3}`, ""},
		{"voteThreshold above replicas", "applied-bad-threshold", `{size: 1Gi, replicas: 1, voteThreshold: 2}`, "voteThreshold must not exceed replicas"},
		{"missing size", "applied-no-size", `{replicas: 3}`, "spec.size: Required value"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := fmt.Sprintf("apiVersion: quorum.csi.dev/v1alpha1\nkind: QuorumVolume\nmetadata: {name: %s}\nspec: %s\n", tt.object, tt.spec)
			path := filepath.Join(t.TempDir(), "qv.yaml")
			if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := srv.Kubectl(t, "apply", "-f", path)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("kubectl apply refused %s: %v", tt.spec, err)
			case tt.want != "" && err == nil:
				t.Fatalf("kubectl apply accepted %s; want %q", tt.spec, tt.want)
			case tt.want != "" && !strings.Contains(err.Error(), tt.want):
				t.Errorf("kubectl apply said %v; want %q", err, tt.want)
			case err != nil:
				t.Logf("refused as a user sees it: %v", err)
			}
		})
	}
}

// checkInvalid wants err to be the API server's Invalid answer carrying
// want, the message a user would see.
func checkInvalid(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("accepted; want rejection with %q", want)
	}
	if !apierrors.IsInvalid(err) {
		t.Fatalf("error %v is not Invalid (422)", err)
	}
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say %q", err, want)
	}
	t.Logf("refused: %v", err)
}
