package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/log"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const maxBackoff = 5 * time.Minute // the kubelet's cap on container restart back-off

// podRun is one pod on this node: its sandbox, its containers, and the goroutine that drives them.
type podRun struct {
	p      *Provider
	ctx    context.Context // cancelled when the pod is being deleted
	cancel context.CancelFunc

	mu          sync.Mutex
	pod         *corev1.Pod
	sb          *sandbox
	initCtrs    []*ctrRun
	ctrs        []*ctrRun
	initialized bool
	phase       corev1.PodPhase // terminal phase once reached; "" while the pod lives
	startTime   metav1.Time
	stopping    bool
	stopped     chan struct{} // closed once every process has ended and the network is gone
	dirty       chan struct{} // a status change to notify
}

// ctrRun is one container of a pod and its current process.
type ctrRun struct {
	spec     corev1.Container
	isInit   bool
	img      *Image
	state    corev1.ContainerState
	lastTerm *corev1.ContainerStateTerminated // how the latest finished run ended
	prevTerm *corev1.ContainerStateTerminated // how the run before it ended
	restarts int32
	ready    bool
	started  bool
	pid      int
	exited   chan struct{} // closed when the current process has ended
	env      []string
	workdir  string
	logPath  string // current run's log; the previous run's is logPath of restarts-1
	logDir   string
	killed   string // why the node stopped the process ("" if it exited on its own)
}

func newPodRun(p *Provider, pod *corev1.Pod) *podRun {
	ctx, cancel := context.WithCancel(p.ctx)
	r := &podRun{p: p, ctx: ctx, cancel: cancel, pod: pod, startTime: metav1.Now(),
		stopped: make(chan struct{}), dirty: make(chan struct{}, 1)}
	r.sb = &sandbox{dir: filepath.Join(p.cfg.StateDir, "pods", string(pod.UID)), hostname: podHostname(pod)}
	for _, c := range pod.Spec.InitContainers {
		r.initCtrs = append(r.initCtrs, newCtr(c, true, r.sb.dir))
	}
	for _, c := range pod.Spec.Containers {
		r.ctrs = append(r.ctrs, newCtr(c, false, r.sb.dir))
	}
	go r.notifier()
	return r
}

func newCtr(spec corev1.Container, isInit bool, dir string) *ctrRun {
	exited := make(chan struct{})
	close(exited)
	return &ctrRun{spec: spec, isInit: isInit, exited: exited, logDir: filepath.Join(dir, "logs", spec.Name),
		state: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating"}}}
}

// changed asks the notifier to send the pod's status (coalescing bursts of changes).
func (r *podRun) changed() {
	select {
	case r.dirty <- struct{}{}:
	default:
	}
}

// notifier sends the latest status to virtual-kubelet after each change, in order, until the
// pod has stopped and its final status has gone out.
func (r *podRun) notifier() {
	for {
		select {
		case <-r.dirty:
			r.p.mu.Lock()
			notify := r.p.notify
			r.p.mu.Unlock()
			notify(r.snapshot())
		case <-r.stopped:
			select {
			case <-r.dirty:
				continue
			default:
				return
			}
		}
	}
}

// run drives the pod: sandbox, volumes, images, init containers, then the containers.
func (r *podRun) run() {
	pod := r.pod
	defer func() {
		if r.ctx.Err() == nil { // the pod finished on its own: its sandbox goes, its files stay for logs
			r.mu.Lock()
			r.phase = r.finalPhase()
			r.mu.Unlock()
			r.p.teardownNetwork(r.sb)
			r.changed()
		}
	}()
	r.changed()
	if !r.retry("FailedCreatePodSandBox", func() error {
		if err := os.MkdirAll(filepath.Join(r.sb.dir, "tmp"), 0o1777); err != nil {
			return err
		}
		_ = os.Chmod(filepath.Join(r.sb.dir, "tmp"), 0o1777)
		return r.p.setupNetwork(pod, r.sb)
	}) {
		return
	}
	r.changed()
	var volumes map[string]string
	if !r.retry("FailedMount", func() (err error) {
		volumes, err = r.p.prepareVolumes(r.ctx, pod, r.sb)
		return err
	}) {
		return
	}
	go r.p.refreshVolumes(r.ctx, pod, r.sb, 2*time.Second)
	if !r.pullImages() {
		return
	}
	for _, c := range r.initCtrs {
		if !r.supervise(c, volumes) {
			return // deleted, or failed for good (restartPolicy Never)
		}
	}
	r.mu.Lock()
	r.initialized = true
	r.mu.Unlock()
	r.changed()
	var wg sync.WaitGroup
	for _, c := range r.ctrs {
		wg.Add(1)
		go func() { defer wg.Done(); r.supervise(c, volumes) }()
	}
	wg.Wait()
}

// retry runs step until it succeeds, with an event per failure and a growing pause; false when
// the pod is deleted meanwhile.
func (r *podRun) retry(reason string, step func() error) bool {
	delay := time.Second
	for {
		err := step()
		if err == nil {
			return true
		}
		r.p.event(r.pod, corev1.EventTypeWarning, reason, "%v", err)
		log.G(r.ctx).WithError(err).Warnf("pod %s/%s: %s", r.pod.Namespace, r.pod.Name, reason)
		select {
		case <-r.ctx.Done():
			return false
		case <-time.After(delay):
		}
		delay = min(delay*2, 30*time.Second)
	}
}

// pullImages resolves every container's image through the image table. An image the table does
// not have can never run here: its container waits in ErrImagePull / ImagePullBackOff, as on a
// kubelet whose registry does not have the image, until the pod is deleted.
func (r *podRun) pullImages() bool {
	var missing []*ctrRun
	for _, c := range append(append([]*ctrRun{}, r.initCtrs...), r.ctrs...) {
		img := r.p.cfg.Images.Lookup(c.spec.Image)
		if img == nil {
			missing = append(missing, c)
			continue
		}
		r.mu.Lock()
		c.img = img
		r.mu.Unlock()
		r.p.event(r.pod, corev1.EventTypeNormal, "Pulled", "Container image %q already present on machine", c.spec.Image)
	}
	if len(missing) == 0 {
		return true
	}
	backoff := r.p.cfg.BackoffBase
	for {
		for _, reason := range []string{"ErrImagePull", "ImagePullBackOff"} {
			r.mu.Lock()
			for _, c := range missing {
				msg := fmt.Sprintf("failed to pull and unpack image %q: this test node runs only the images in its "+
					"image table (%s)", c.spec.Image, r.p.cfg.ImagesFile)
				if reason == "ImagePullBackOff" {
					msg = fmt.Sprintf("Back-off pulling image %q", c.spec.Image)
				}
				c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: msg}}
				if reason == "ErrImagePull" {
					r.p.event(r.pod, corev1.EventTypeWarning, "Failed", "Failed to pull image %q: %s", c.spec.Image, msg)
					r.p.event(r.pod, corev1.EventTypeWarning, "Failed", "Error: ErrImagePull")
				}
			}
			r.mu.Unlock()
			r.changed()
			select {
			case <-r.ctx.Done():
				return false
			case <-time.After(backoff):
			}
		}
		backoff = min(backoff*2, maxBackoff)
	}
}

// supervise runs a container until it is done for good under the pod's restartPolicy; true when
// it ended successfully (what an init container must do before the next one starts).
func (r *podRun) supervise(c *ctrRun, volumes map[string]string) bool {
	policy := r.pod.Spec.RestartPolicy
	backoff := r.p.cfg.BackoffBase
	for {
		started := time.Now()
		code, err := r.runOnce(c, volumes)
		if r.ctx.Err() != nil {
			return false
		}
		if err != nil { // the process could not be created: configuration errors wait and retry
			var cfgErr *configError
			if errors.As(err, &cfgErr) {
				r.setWaiting(c, "CreateContainerConfigError", err.Error())
				r.p.event(r.pod, corev1.EventTypeWarning, "Failed", "Error: %v", err)
				if !r.sleep(backoff) {
					return false
				}
				continue
			}
			r.p.event(r.pod, corev1.EventTypeWarning, "Failed", "Error: %v", err)
		}
		restart := policy == corev1.RestartPolicyAlways && !c.isInit ||
			(policy == corev1.RestartPolicyOnFailure || policy == corev1.RestartPolicyAlways && c.isInit) && code != 0
		if !restart {
			return code == 0
		}
		if time.Since(started) > 10*time.Minute { // a container that ran a while starts over
			backoff = r.p.cfg.BackoffBase
		}
		r.setWaiting(c, "CrashLoopBackOff", fmt.Sprintf("back-off %s restarting failed container=%s pod=%s_%s(%s)",
			backoff, c.spec.Name, r.pod.Name, r.pod.Namespace, r.pod.UID))
		r.p.event(r.pod, corev1.EventTypeWarning, "BackOff", "Back-off restarting failed container %s in pod %s_%s(%s)",
			c.spec.Name, r.pod.Name, r.pod.Namespace, r.pod.UID)
		if !r.sleep(backoff) {
			return false
		}
		backoff = min(backoff*2, maxBackoff)
		r.mu.Lock()
		c.restarts++
		r.mu.Unlock()
	}
}

func (r *podRun) sleep(d time.Duration) bool {
	select {
	case <-r.ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

func (r *podRun) setWaiting(c *ctrRun, reason, msg string) {
	r.mu.Lock()
	c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: msg}}
	r.mu.Unlock()
	r.changed()
}

// configError is a container whose configuration cannot be resolved yet (a missing Secret key).
type configError struct{ err error }

func (e *configError) Error() string { return e.err.Error() }

// runOnce starts the container's process in the pod's namespaces, runs its probes, and waits for
// it to end. The exit code is the process's, or 128+signal when a signal ended it.
func (r *podRun) runOnce(c *ctrRun, volumes map[string]string) (int32, error) {
	pod := r.pod
	env, err := r.p.containerEnv(pod, &c.spec, c.img, r.sb.ip)
	if err != nil {
		return 0, &configError{err}
	}
	spec, err := r.processSpec(c, volumes, env)
	if err != nil {
		return 0, &configError{err}
	}
	n := c.restarts
	runDir := filepath.Join(r.sb.dir, "containers", c.spec.Name)
	specPath, err := writeSpec(filepath.Join(runDir, fmt.Sprintf("run-%d", n)), spec)
	if err != nil {
		return 128, err
	}
	var argv []string
	if r.sb.netns != "" {
		argv = []string{"ip", "netns", "exec", r.sb.netns, "unshare", "--uts", r.p.self, "init", specPath}
	} else {
		spec.Hostname = ""
		if _, err := writeSpec(filepath.Join(runDir, fmt.Sprintf("run-%d", n)), spec); err != nil {
			return 128, err
		}
		argv = []string{"unshare", "--mount", "--propagation", "slave", r.p.self, "init", specPath}
	}
	if err := os.MkdirAll(c.logDir, 0o755); err != nil {
		return 128, err
	}
	logPath := filepath.Join(c.logDir, fmt.Sprintf("%d.log", n))
	logs, err := newLogFile(logPath)
	if err != nil {
		return 128, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, stderr := logs.stream("stdout"), logs.stream("stderr")
	logs.closeWhenDone()
	cmd.Stdout, cmd.Stderr = stdout.w, stderr.w
	startErr := cmd.Start()
	stdout.closeWriter()
	stderr.closeWriter()
	if startErr != nil {
		return 128, fmt.Errorf("start %s: %w", c.spec.Name, startErr)
	}
	exited := make(chan struct{})
	now := metav1.Now()
	r.mu.Lock()
	c.pid, c.env, c.workdir, c.logPath, c.exited, c.killed = cmd.Process.Pid, env, spec.WorkingDir, logPath, exited, ""
	c.state = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}
	c.started = c.spec.StartupProbe == nil
	c.ready = c.spec.ReadinessProbe == nil && c.started && !c.isInit
	r.mu.Unlock()
	r.p.event(pod, corev1.EventTypeNormal, "Started", "Started container %s", c.spec.Name)
	r.changed()

	probeCtx, stopProbes := context.WithCancel(r.ctx)
	if !c.isInit {
		go r.probe(probeCtx, c)
	}
	waitErr := cmd.Wait()
	stopProbes()
	code := exitCode(cmd.ProcessState, waitErr)
	logs.waitAndClose(2 * time.Second)

	r.mu.Lock()
	reason := "Completed"
	if code != 0 {
		reason = "Error"
	}
	msg := ""
	if c.killed != "" {
		msg = c.killed
	}
	c.state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
		ExitCode: code, Reason: reason, Message: msg, StartedAt: now, FinishedAt: metav1.Now(),
		ContainerID: containerID(c.pid), Signal: signalOf(cmd.ProcessState),
	}}
	c.prevTerm, c.lastTerm = c.lastTerm, c.state.Terminated.DeepCopy()
	c.ready, c.pid = false, 0
	close(exited)
	r.mu.Unlock()
	r.changed()
	return code, nil
}

func containerID(pid int) string { return fmt.Sprintf("nanorun://%d", pid) }

func exitCode(state *os.ProcessState, err error) int32 {
	if state == nil {
		return 128
	}
	if ws, ok := state.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int32(ws.Signal())
	}
	return int32(state.ExitCode())
}

func signalOf(state *os.ProcessState) int32 {
	if state == nil {
		return 0
	}
	if ws, ok := state.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return int32(ws.Signal())
	}
	return 0
}

// processSpec is the container's mounts, hostname, working directory and argv.
func (r *podRun) processSpec(c *ctrRun, volumes map[string]string, env []string) (*processSpec, error) {
	img := c.img
	workdir := c.spec.WorkingDir
	if workdir == "" {
		workdir = img.WorkingDir
	}
	// $(VAR) in command and args is the container's environment variable, as the kubelet expands it.
	vars := make(map[string]string, len(env))
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			vars[k] = v
		}
	}
	command, args := expandAll(c.spec.Command, vars), expandAll(c.spec.Args, vars)
	spec := &processSpec{Hostname: r.sb.hostname, WorkingDir: workdir, Argv: img.Argv(command, args)}
	if len(spec.Argv) == 0 {
		return nil, fmt.Errorf("container %s has no command and image %s no entrypoint", c.spec.Name, c.spec.Image)
	}
	// The container's own filesystem is its working directory; /tmp is the pod's (a real
	// container's /tmp is private to it; ours are per pod so that daemons like Ray's do not meet).
	own := filepath.Join(r.sb.dir, "containers", c.spec.Name, "root")
	if err := os.MkdirAll(own, 0o755); err != nil {
		return nil, err
	}
	if workdir != "" && workdir != "/" {
		spec.Mounts = append(spec.Mounts, mountSpec{Source: own, Target: workdir})
	}
	spec.Mounts = append(spec.Mounts, mountSpec{Source: filepath.Join(r.sb.dir, "tmp"), Target: "/tmp"})
	targets := make([]string, 0, len(img.Files))
	for target := range img.Files {
		targets = append(targets, target)
	}
	sort.Strings(targets)
	for _, target := range targets {
		spec.Mounts = append(spec.Mounts, mountSpec{Source: img.Files[target], Target: target, ReadOnly: true})
	}
	for _, m := range c.spec.VolumeMounts {
		src, ok := volumes[m.Name]
		if !ok {
			return nil, fmt.Errorf("volumeMount %q: no volume of that name", m.Name)
		}
		if m.SubPath != "" {
			src = filepath.Join(src, m.SubPath)
			if _, err := os.Stat(src); os.IsNotExist(err) {
				if err := os.MkdirAll(src, 0o777); err != nil {
					return nil, err
				}
			}
		}
		spec.Mounts = append(spec.Mounts, mountSpec{Source: src, Target: m.MountPath, ReadOnly: m.ReadOnly})
	}
	// Last, so that neither the pod's /tmp nor a volume mounted there hides them: the folders the
	// images' programs live in, and this node's own binary (exec probes and kubectl exec run it
	// inside the container), when they are under /tmp.
	for _, keep := range append(append([]string{}, r.p.cfg.HostPaths...), filepath.Dir(r.p.self)) {
		if strings.HasPrefix(keep, "/tmp/") {
			spec.Mounts = append(spec.Mounts, mountSpec{Source: keep, Target: keep, ReadOnly: true})
		}
	}
	return spec, nil
}

func writeSpec(base string, spec *processSpec) (string, error) {
	if err := os.MkdirAll(filepath.Dir(base), 0o755); err != nil {
		return "", err
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		return "", err
	}
	f, err := os.CreateTemp(filepath.Dir(base), filepath.Base(base)+"-*.json")
	if err != nil {
		return "", err
	}
	defer f.Close()
	_, err = f.Write(raw)
	return f.Name(), err
}

// kill stops a container's current process: SIGTERM, then SIGKILL to its process group after
// grace. It returns when the process has ended.
func (r *podRun) kill(c *ctrRun, grace time.Duration, why string) {
	r.mu.Lock()
	pid, exited := c.pid, c.exited
	if pid != 0 {
		c.killed = why
	}
	r.mu.Unlock()
	if pid == 0 {
		return
	}
	r.preStop(c, grace)
	_ = syscall.Kill(pid, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(grace):
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		<-exited
	}
}

// preStop runs the container's preStop hook (exec or HTTP), within the grace period.
func (r *podRun) preStop(c *ctrRun, grace time.Duration) {
	if c.spec.Lifecycle == nil || c.spec.Lifecycle.PreStop == nil || grace <= 0 {
		return
	}
	ctx, cancel := context.WithTimeout(r.ctx, grace)
	defer cancel()
	h := c.spec.Lifecycle.PreStop
	var err error
	switch {
	case h.Exec != nil:
		err = r.execProbe(ctx, c, h.Exec.Command)
	case h.HTTPGet != nil:
		err = r.httpProbe(ctx, c, h.HTTPGet)
	case h.Sleep != nil:
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(h.Sleep.Seconds) * time.Second):
		}
	}
	if err != nil {
		r.p.event(r.pod, corev1.EventTypeWarning, "FailedPreStopHook", "PreStopHook failed: %v", err)
	}
}

// stop ends the pod (deletion or eviction): every container's process gets SIGTERM, then
// SIGKILL after grace; then the network namespace and its stray processes go, the terminal
// status is sent, and done runs. Safe to call more than once.
func (r *podRun) stop(grace time.Duration, done func()) {
	r.mu.Lock()
	if r.stopping {
		r.mu.Unlock()
		<-r.stopped
		return
	}
	r.stopping = true
	r.mu.Unlock()
	r.cancel() // no more restarts, probes or retries
	var wg sync.WaitGroup
	for _, c := range append(append([]*ctrRun{}, r.initCtrs...), r.ctrs...) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.p.event(r.pod, corev1.EventTypeNormal, "Killing", "Stopping container %s", c.spec.Name)
			r.kill(c, grace, "")
		}()
	}
	wg.Wait()
	r.p.teardownNetwork(r.sb)
	r.mu.Lock()
	for _, c := range append(append([]*ctrRun{}, r.initCtrs...), r.ctrs...) {
		if c.state.Terminated == nil && c.lastTerm != nil { // waiting to restart: how it last ended
			c.state = corev1.ContainerState{Terminated: c.lastTerm}
			c.lastTerm = c.prevTerm
		} else if c.state.Terminated == nil { // never started: report it as the kubelet does
			c.state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
				ExitCode: 137, Reason: "ContainerStatusUnknown",
				Message: "The container could not be located when the pod was terminated"}}
		}
		c.ready = false
	}
	if r.phase == "" {
		r.phase = r.finalPhase()
	}
	r.mu.Unlock()
	r.changed()
	close(r.stopped)
	// Keep the pod known a little longer so that virtual-kubelet reads its final status.
	time.AfterFunc(5*time.Second, func() {
		done()
		r.sb.removeFiles()
	})
}

// finalPhase: Succeeded when every container ended with 0, else Failed (call with r.mu held).
func (r *podRun) finalPhase() corev1.PodPhase {
	for _, c := range append(append([]*ctrRun{}, r.initCtrs...), r.ctrs...) {
		if c.state.Terminated == nil || c.state.Terminated.ExitCode != 0 {
			return corev1.PodFailed
		}
	}
	return corev1.PodSucceeded
}

// snapshot is the pod with its current status, for virtual-kubelet.
func (r *podRun) snapshot() *corev1.Pod {
	r.mu.Lock()
	defer r.mu.Unlock()
	pod := r.pod.DeepCopy()
	st := &pod.Status
	st.HostIP = r.p.cfg.NodeIP
	st.HostIPs = []corev1.HostIP{{IP: r.p.cfg.NodeIP}}
	if r.sb.ip != "" {
		st.PodIP = r.sb.ip
		st.PodIPs = []corev1.PodIP{{IP: r.sb.ip}}
	}
	st.StartTime = &r.startTime
	st.InitContainerStatuses = r.statuses(r.initCtrs)
	st.ContainerStatuses = r.statuses(r.ctrs)
	allReady := len(r.ctrs) > 0
	running := false
	for _, c := range r.ctrs {
		allReady = allReady && c.ready
		running = running || c.state.Running != nil || c.state.Terminated != nil || c.restarts > 0
	}
	switch {
	case r.phase != "":
		st.Phase = r.phase
	case r.initialized && running:
		st.Phase = corev1.PodRunning
	default:
		st.Phase = corev1.PodPending
	}
	if r.phase != "" {
		allReady = false
	}
	cond := func(t corev1.PodConditionType, ok bool, reason string) corev1.PodCondition {
		c := corev1.PodCondition{Type: t, Status: corev1.ConditionFalse, Reason: reason, LastTransitionTime: r.startTime}
		if ok {
			c.Status, c.Reason = corev1.ConditionTrue, ""
		}
		return c
	}
	st.Conditions = []corev1.PodCondition{
		cond(corev1.PodReadyToStartContainers, r.sb.networkUp, ""),
		cond(corev1.PodInitialized, r.initialized, "ContainersNotInitialized"),
		cond(corev1.ContainersReady, allReady, "ContainersNotReady"),
		cond(corev1.PodReady, allReady, "ContainersNotReady"),
		cond(corev1.PodScheduled, true, ""),
	}
	return pod
}

func (r *podRun) statuses(ctrs []*ctrRun) []corev1.ContainerStatus {
	out := make([]corev1.ContainerStatus, 0, len(ctrs))
	for _, c := range ctrs {
		started := c.started && c.state.Running != nil
		s := corev1.ContainerStatus{
			Name: c.spec.Name, Image: c.spec.Image, ImageID: "nanorun-image://" + repository(c.spec.Image),
			State: c.state, Ready: c.ready, RestartCount: c.restarts, Started: &started,
		}
		if last := c.lastTerm; c.state.Terminated != nil {
			last = c.prevTerm
			if last != nil {
				s.LastTerminationState = corev1.ContainerState{Terminated: last.DeepCopy()}
			}
		} else if last != nil {
			s.LastTerminationState = corev1.ContainerState{Terminated: last.DeepCopy()}
		}
		if c.state.Running != nil {
			s.ContainerID = containerID(c.pid)
		} else if c.state.Terminated != nil {
			s.ContainerID = c.state.Terminated.ContainerID
		}
		out = append(out, s)
	}
	return out
}

// describe is "namespace/name" for messages.
func describe(pod *corev1.Pod) string { return strings.Join([]string{pod.Namespace, pod.Name}, "/") }
