package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/log"
	"github.com/virtual-kubelet/virtual-kubelet/node/nodeutil"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	corev1listers "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/record"
	statsv1alpha1 "k8s.io/kubelet/pkg/apis/stats/v1alpha1"
)

// Provider runs the pods bound to this node as local processes (virtual-kubelet's provider
// interface, with asynchronous status notification).
type Provider struct {
	ctx         context.Context
	cfg         *Config
	client      kubernetes.Interface
	recorder    record.EventRecorder
	configMaps  corev1listers.ConfigMapLister
	secrets     corev1listers.SecretLister
	services    corev1listers.ServiceLister
	allocatable corev1.ResourceList
	ipam        *ipam
	self        string // this binary, the in-namespace helper

	mu     sync.Mutex
	pods   map[string]*podRun // namespace/name
	notify func(*corev1.Pod)
}

var _ nodeutil.Provider = (*Provider)(nil)

func NewProvider(ctx context.Context, cfg *Config, client kubernetes.Interface, recorder record.EventRecorder,
	pc nodeutil.ProviderConfig) (*Provider, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	addrs, err := newIPAM(cfg.PodCIDR)
	if err != nil {
		return nil, err
	}
	if cfg.StateDir == "" {
		return nil, fmt.Errorf("--state-dir is required")
	}
	if err := os.MkdirAll(filepath.Join(cfg.StateDir, "pods"), 0o755); err != nil {
		return nil, err
	}
	p := &Provider{
		ctx: ctx, cfg: cfg, client: client, recorder: recorder,
		configMaps: pc.ConfigMaps, secrets: pc.Secrets, services: pc.Services,
		allocatable: pc.Node.Status.Allocatable, ipam: addrs, self: self,
		pods: map[string]*podRun{}, notify: func(*corev1.Pod) {},
	}
	p.removeLeftovers()
	return p, nil
}

// removeLeftovers deletes network namespaces and pod folders a previous run of this node left
// (a node agent that was killed outright): their pods are recreated from the API server.
func (p *Provider) removeLeftovers() {
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), p.cfg.NetnsPrefix) {
			killNetnsProcesses(e.Name())
			_ = run("ip", "netns", "del", e.Name())
			_ = os.RemoveAll(filepath.Join("/etc/netns", e.Name()))
		}
	}
	dirs, _ := os.ReadDir(filepath.Join(p.cfg.StateDir, "pods"))
	for _, d := range dirs {
		(&sandbox{dir: filepath.Join(p.cfg.StateDir, "pods", d.Name())}).removeFiles()
	}
}

func key(namespace, name string) string { return namespace + "/" + name }

func (p *Provider) lookup(namespace, name string) (*podRun, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, ok := p.pods[key(namespace, name)]
	if !ok {
		return nil, errdefs.NotFoundf("pod %s/%s is not known to node %s", namespace, name, p.cfg.NodeName)
	}
	return r, nil
}

// NotifyPods registers virtual-kubelet's status callback.
func (p *Provider) NotifyPods(_ context.Context, notify func(*corev1.Pod)) {
	p.mu.Lock()
	p.notify = notify
	p.mu.Unlock()
}

func (p *Provider) CreatePod(_ context.Context, pod *corev1.Pod) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	k := key(pod.Namespace, pod.Name)
	if old, ok := p.pods[k]; ok && old.pod.UID == pod.UID {
		return nil
	}
	r := newPodRun(p, pod.DeepCopy())
	p.pods[k] = r
	go r.run()
	return nil
}

func (p *Provider) UpdatePod(_ context.Context, pod *corev1.Pod) error {
	r, err := p.lookup(pod.Namespace, pod.Name)
	if err != nil {
		return p.CreatePod(p.ctx, pod)
	}
	r.mu.Lock()
	if r.pod.UID == pod.UID {
		r.pod.ObjectMeta = *pod.ObjectMeta.DeepCopy()
	}
	r.mu.Unlock()
	return nil
}

// DeletePod stops the pod as the kubelet does: SIGTERM, SIGKILL after the grace period, then the
// sandbox goes, and the terminal status (exit codes) is notified. It returns when the processes
// are gone: virtual-kubelet force-deletes the pod object a grace period after DeletePod returns,
// and the status must reach the API server first, as a kubelet's does.
func (p *Provider) DeletePod(_ context.Context, pod *corev1.Pod) error {
	r, err := p.lookup(pod.Namespace, pod.Name)
	if err != nil {
		return err
	}
	grace := int64(corev1.DefaultTerminationGracePeriodSeconds)
	if pod.Spec.TerminationGracePeriodSeconds != nil {
		grace = *pod.Spec.TerminationGracePeriodSeconds
	}
	if pod.DeletionGracePeriodSeconds != nil {
		grace = *pod.DeletionGracePeriodSeconds
	}
	r.mu.Lock()
	r.pod.DeletionTimestamp = pod.DeletionTimestamp
	r.pod.DeletionGracePeriodSeconds = pod.DeletionGracePeriodSeconds
	r.mu.Unlock()
	r.stop(time.Duration(grace)*time.Second, func() {
		p.mu.Lock()
		if p.pods[key(pod.Namespace, pod.Name)] == r {
			delete(p.pods, key(pod.Namespace, pod.Name))
		}
		p.mu.Unlock()
		p.removeFromAPI(pod)
	})
	return nil
}

// removeFromAPI deletes a stopped pod's object at once, as the kubelet does once a terminating
// pod's containers have ended (virtual-kubelet itself would wait out the grace period again).
func (p *Provider) removeFromAPI(pod *corev1.Pod) {
	zero := int64(0)
	uid := pod.UID
	err := p.client.CoreV1().Pods(pod.Namespace).Delete(p.ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &uid}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		log.G(p.ctx).WithError(err).Warnf("could not remove pod %s/%s", pod.Namespace, pod.Name)
	}
}

func (p *Provider) GetPod(_ context.Context, namespace, name string) (*corev1.Pod, error) {
	r, err := p.lookup(namespace, name)
	if err != nil {
		return nil, err
	}
	return r.snapshot(), nil
}

func (p *Provider) GetPodStatus(ctx context.Context, namespace, name string) (*corev1.PodStatus, error) {
	pod, err := p.GetPod(ctx, namespace, name)
	if err != nil {
		return nil, err
	}
	return &pod.Status, nil
}

func (p *Provider) GetPods(context.Context) ([]*corev1.Pod, error) {
	p.mu.Lock()
	runs := make([]*podRun, 0, len(p.pods))
	for _, r := range p.pods {
		runs = append(runs, r)
	}
	p.mu.Unlock()
	pods := make([]*corev1.Pod, 0, len(runs))
	for _, r := range runs {
		pods = append(pods, r.snapshot())
	}
	return pods, nil
}

// Shutdown ends every pod at once (SIGKILL) and removes its sandbox: what stopping the test
// cluster needs, so that nothing is left behind.
func (p *Provider) Shutdown() {
	p.mu.Lock()
	runs := make([]*podRun, 0, len(p.pods))
	for _, r := range p.pods {
		runs = append(runs, r)
	}
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, r := range runs {
		wg.Add(1)
		go func() { defer wg.Done(); r.stop(0, func() {}) }()
	}
	wg.Wait()
	for _, r := range runs {
		r.sb.removeFiles()
	}
}

func (p *Provider) event(pod *corev1.Pod, eventType, reason, format string, args ...any) {
	p.recorder.Eventf(pod, eventType, reason, format, args...)
}

// --- the kubelet HTTP API's other endpoints -----------------------------------------------------

func (p *Provider) GetStatsSummary(context.Context) (*statsv1alpha1.Summary, error) {
	now := metav1.Now()
	summary := &statsv1alpha1.Summary{Node: statsv1alpha1.NodeStats{NodeName: p.cfg.NodeName, StartTime: now}}
	pods, _ := p.GetPods(p.ctx)
	for _, pod := range pods {
		summary.Pods = append(summary.Pods, statsv1alpha1.PodStats{
			PodRef:    statsv1alpha1.PodReference{Name: pod.Name, Namespace: pod.Namespace, UID: string(pod.UID)},
			StartTime: now,
		})
	}
	return summary, nil
}

func (p *Provider) GetMetricsResource(context.Context) ([]*dto.MetricFamily, error) {
	return nil, nil
}

// runIn runs argv inside a running container: its namespaces (nsenter), environment and working
// directory. Used by kubectl exec and exec probes.
func (p *Provider) runIn(ctx context.Context, r *podRun, c *ctrRun, argv []string) (*exec.Cmd, error) {
	r.mu.Lock()
	pid, env, workdir := c.pid, c.env, c.workdir
	r.mu.Unlock()
	if pid == 0 {
		return nil, errdefs.InvalidInputf("container %s is not running", c.spec.Name)
	}
	spec, err := json.Marshal(processSpec{WorkingDir: workdir, Argv: argv})
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, "nsenter", "-t", fmt.Sprint(pid), "-m", "-u", "-n", "--", p.self, "exec", string(spec))
	cmd.Env = env
	cmd.Cancel = func() error { return cmd.Process.Kill() }
	return cmd, nil
}
