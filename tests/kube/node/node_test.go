package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestImageLookupMatchesTrailingPathComponents(t *testing.T) {
	table := &ImageTable{Images: []Image{{Repository: "nanorun-trainer"}, {Repository: "kuberay/operator"}}}
	for ref, want := range map[string]string{
		"ghcr.io/nanorun/nanorun-trainer:0.3.0":      "nanorun-trainer",
		"nanorun-trainer@sha256:0123":                "nanorun-trainer",
		"localhost:5000/nanorun-trainer":             "nanorun-trainer",
		"quay.io/kuberay/operator:v1.6.1":            "kuberay/operator",
		"quay.io/someone-else/operator:v1":           "",
		"busybox:1.36":                               "",
		"ghcr.io/nanorun/not-nanorun-trainer:latest": "",
	} {
		got := table.Lookup(ref)
		if (got == nil) != (want == "") || got != nil && got.Repository != want {
			t.Errorf("Lookup(%q) = %v, want %q", ref, got, want)
		}
	}
}

func TestArgvFollowsKubernetesCommandRulesAndMapsExecutables(t *testing.T) {
	img := &Image{Entrypoint: []string{"/manager"}, Cmd: []string{"--default"},
		Executables: map[string]string{"/manager": "/bin/ray-operator"}}
	cases := []struct{ command, args, want []string }{
		{nil, nil, []string{"/bin/ray-operator", "--default"}},
		{nil, []string{"--x"}, []string{"/bin/ray-operator", "--x"}},
		{[]string{"python", "-c"}, []string{"pass"}, []string{"python", "-c", "pass"}},
	}
	for _, c := range cases {
		if got := img.Argv(c.command, c.args); strings.Join(got, " ") != strings.Join(c.want, " ") {
			t.Errorf("Argv(%v, %v) = %v, want %v", c.command, c.args, got, c.want)
		}
	}
}

func TestExpandReplacesKnownVariablesOnly(t *testing.T) {
	env := map[string]string{"POD": "web-0", "EMPTY": ""}
	for in, want := range map[string]string{
		"$(POD)-x":         "web-0-x",
		"$(MISSING)":       "$(MISSING)",
		"$$(POD)":          "$(POD)",
		"a$(EMPTY)b":       "ab",
		"cost $5":          "cost $5",
		"unclosed $(POD":   "unclosed $(POD",
		"$(POD)$(POD)":     "web-0web-0",
		"trailing dollar$": "trailing dollar$",
	} {
		if got := expand(in, env); got != want {
			t.Errorf("expand(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestResolvConfFollowsDNSPolicy(t *testing.T) {
	p := &Provider{cfg: &Config{ClusterDNS: "10.96.0.10", ClusterDomain: "cluster.local"}}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "team-a"}}
	got := p.resolvConf(pod)
	want := "nameserver 10.96.0.10\nsearch team-a.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
	if got != want {
		t.Errorf("ClusterFirst:\n%s\nwant:\n%s", got, want)
	}
	ndots := "2"
	pod.Spec.DNSPolicy = corev1.DNSNone
	pod.Spec.DNSConfig = &corev1.PodDNSConfig{Nameservers: []string{"1.1.1.1"}, Options: []corev1.PodDNSConfigOption{{Name: "ndots", Value: &ndots}}}
	if got := p.resolvConf(pod); got != "nameserver 1.1.1.1\noptions ndots:2\n" {
		t.Errorf("None: %q", got)
	}
	pod.Spec.DNSPolicy, pod.Spec.DNSConfig, pod.Spec.HostNetwork = corev1.DNSClusterFirst, nil, true
	if strings.Contains(p.resolvConf(pod), "10.96.0.10") {
		t.Errorf("ClusterFirst on the host network uses the node's resolver, got %q", p.resolvConf(pod))
	}
}

func TestIPAMHandsOutEachAddressOnce(t *testing.T) {
	a, err := newIPAM("10.244.1.0/29") // .2 … .6 usable
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for i := 0; i < 5; i++ {
		ip, err := a.allocate()
		if err != nil {
			t.Fatalf("allocation %d: %v", i, err)
		}
		if seen[ip.String()] || ip.String() == "10.244.1.1" || ip.String() == "10.244.1.7" {
			t.Fatalf("bad address %s", ip)
		}
		seen[ip.String()] = true
	}
	if _, err := a.allocate(); err == nil {
		t.Fatal("a full range still gave an address")
	}
	a.release("10.244.1.4")
	if ip, err := a.allocate(); err != nil || ip.String() != "10.244.1.4" {
		t.Fatalf("after release: %v %v", ip, err)
	}
}

func TestAddressesGoRoundRobinSoAFreedOneIsNotReusedAtOnce(t *testing.T) {
	a, _ := newIPAM("10.244.1.0/24")
	first, _ := a.allocate()
	a.release(first.String())
	if next, _ := a.allocate(); next == first {
		t.Fatalf("%s was handed out again at once (stale neighbour caches would still point at its old owner)", first)
	}
}

func TestAPodAddressIsGivenBackOnceThoughTheSandboxIsTornDownTwice(t *testing.T) {
	a, _ := newIPAM("10.244.1.0/29") // .2 … .6: five addresses, so the freed one comes round again
	allocate := func() *sandbox {
		ip, err := a.allocate()
		if err != nil {
			t.Fatal(err)
		}
		return &sandbox{ip: ip.String(), ipHeld: true}
	}
	finished := allocate()
	a.releaseHeld(finished) // the pod finished on its own
	for i := 0; i < 4; i++ {
		allocate() // the other four addresses
	}
	next := allocate()
	if next.ip != finished.ip {
		t.Fatalf("the freed address was not reused: %s, then %s", finished.ip, next.ip)
	}
	a.releaseHeld(finished) // the finished pod is deleted: its address is next's now
	if ip, err := a.allocate(); err == nil {
		t.Fatalf("a full range gave %s again", ip)
	}
}

func TestFieldValueResolvesDownwardAPIPaths(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns", UID: "u",
		Labels: map[string]string{"app": "web"}, Annotations: map[string]string{"a": "b"}},
		Spec: corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "sa"}}
	for path, want := range map[string]string{
		"metadata.name": "p", "metadata.namespace": "ns", "metadata.uid": "u", "spec.nodeName": "node-1",
		"spec.serviceAccountName": "sa", "metadata.labels['app']": "web", "metadata.annotations['a']": "b",
		"metadata.labels": `app="web"`,
	} {
		if got, err := fieldValue(pod, path); err != nil || got != want {
			t.Errorf("fieldValue(%q) = %q, %v; want %q", path, got, err, want)
		}
	}
	if _, err := fieldValue(pod, "spec.nope"); err == nil {
		t.Error("an unknown fieldPath resolved")
	}
}

func TestLogsKeepStreamsAndServeTailSinceAndTimestamps(t *testing.T) {
	path := filepath.Join(t.TempDir(), "0.log")
	logs, err := newLogFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out, errOut := logs.stream("stdout"), logs.stream("stderr")
	logs.closeWhenDone()
	// stdout and stderr are copied concurrently: stderr's line goes first, and is in the file
	// before stdout writes, so that the order is known.
	_, _ = errOut.w.WriteString("oops\n")
	errOut.closeWriter()
	for raw, _ := os.ReadFile(path); !strings.Contains(string(raw), "oops"); raw, _ = os.ReadFile(path) {
		time.Sleep(time.Millisecond)
	}
	_, _ = out.w.WriteString("one\ntwo\n")
	_, _ = out.w.WriteString("partial")
	out.closeWriter()
	logs.waitAndClose(2 * time.Second)
	raw, _ := os.ReadFile(path)
	if !strings.Contains(string(raw), " stderr F oops\n") || !strings.Contains(string(raw), " stdout P partial\n") {
		t.Fatalf("CRI log format:\n%s", raw)
	}
	read := func(opts api.ContainerLogOpts) string {
		var buf bytes.Buffer
		if err := copyLogs(context.Background(), path, opts, nil, &buf); err != nil {
			t.Fatal(err)
		}
		return buf.String()
	}
	all := read(api.ContainerLogOpts{})
	for _, line := range []string{"one\n", "two\n", "oops\n", "partial"} {
		if !strings.Contains(all, line) {
			t.Errorf("%q missing from %q", line, all)
		}
	}
	if got := read(api.ContainerLogOpts{Tail: 1}); strings.Count(got, "\n") > 0 || got != "partial" {
		t.Errorf("tail 1 = %q", got)
	}
	if got := read(api.ContainerLogOpts{LimitBytes: 7}); got != "oops\non" {
		t.Errorf("limit 5 = %q", got)
	}
	if got := read(api.ContainerLogOpts{SinceTime: time.Now().Add(time.Hour)}); got != "" {
		t.Errorf("since the future = %q", got)
	}
	stamped := read(api.ContainerLogOpts{Timestamps: true, Tail: 1})
	if _, err := time.Parse(time.RFC3339Nano, strings.Fields(stamped)[0]); err != nil {
		t.Errorf("timestamps: %q", stamped)
	}
}

func TestExpandAllKeepsNilAndExpandsEach(t *testing.T) {
	if expandAll(nil, nil) != nil {
		t.Error("nil command must stay nil (the image's entrypoint is used)")
	}
	got := expandAll([]string{"--cluster-name", "$(RAY_CLUSTER_NAME)"}, map[string]string{"RAY_CLUSTER_NAME": "chat"})
	if got[1] != "chat" {
		t.Errorf("got %v", got)
	}
}
