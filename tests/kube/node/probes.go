package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// probe runs the container's startup, liveness and readiness probes with the kubelet's semantics
// (https://kubernetes.io/docs/concepts/configuration/liveness-readiness-startup-probes/): liveness
// and readiness start after the startup probe succeeds; failureThreshold consecutive liveness (or
// startup) failures restart the container; readiness sets the container's Ready.
func (r *podRun) probe(ctx context.Context, c *ctrRun) {
	spec := c.spec
	if spec.StartupProbe != nil {
		if !r.runProbe(ctx, c, spec.StartupProbe, "Startup", func(ok bool) bool { return !ok }) {
			return
		}
		r.mu.Lock()
		c.started = true
		c.ready = spec.ReadinessProbe == nil
		r.mu.Unlock()
		r.changed()
	}
	if spec.ReadinessProbe != nil {
		go r.runProbe(ctx, c, spec.ReadinessProbe, "Readiness", func(ok bool) bool {
			r.mu.Lock()
			changed := c.ready != ok
			c.ready = ok
			r.mu.Unlock()
			if changed {
				r.changed()
			}
			return true
		})
	}
	if spec.LivenessProbe != nil {
		r.runProbe(ctx, c, spec.LivenessProbe, "Liveness", func(bool) bool { return true })
	}
}

// runProbe probes every period. onResult gets each thresholded result (true: succeeded
// successThreshold times in a row; false: failed failureThreshold times) and says whether to go
// on. A Startup or Liveness probe that reaches its failure threshold kills the container; runProbe
// then returns false. It returns true when onResult stops it.
func (r *podRun) runProbe(ctx context.Context, c *ctrRun, p *corev1.Probe, kind string, onResult func(bool) bool) bool {
	period := time.Duration(max(p.PeriodSeconds, 1)) * time.Second
	timeout := time.Duration(max(p.TimeoutSeconds, 1)) * time.Second
	success, failure := max(p.SuccessThreshold, 1), max(p.FailureThreshold, 1)
	select {
	case <-ctx.Done():
		return false
	case <-time.After(time.Duration(p.InitialDelaySeconds) * time.Second):
	}
	var okRun, failRun int32
	for {
		pctx, cancel := context.WithTimeout(ctx, timeout)
		err := r.probeOnce(pctx, c, &p.ProbeHandler)
		cancel()
		if ctx.Err() != nil {
			return false
		}
		if err == nil {
			okRun, failRun = okRun+1, 0
			if okRun >= success && !onResult(true) {
				return true
			}
		} else {
			okRun, failRun = 0, failRun+1
			r.p.event(r.pod, corev1.EventTypeWarning, "Unhealthy", "%s probe failed: %v", kind, err)
			if failRun >= failure {
				if kind != "Readiness" {
					why := fmt.Sprintf("Container %s failed %s probe, will be restarted", c.spec.Name, strings.ToLower(kind))
					r.p.event(r.pod, corev1.EventTypeNormal, "Killing", "%s", why)
					grace := time.Duration(corev1.DefaultTerminationGracePeriodSeconds) * time.Second
					if p.TerminationGracePeriodSeconds != nil {
						grace = time.Duration(*p.TerminationGracePeriodSeconds) * time.Second
					} else if g := r.pod.Spec.TerminationGracePeriodSeconds; g != nil {
						grace = time.Duration(*g) * time.Second
					}
					go r.kill(c, grace, why)
					return false
				}
				if !onResult(false) {
					return true
				}
			}
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(period):
		}
	}
}

func (r *podRun) probeOnce(ctx context.Context, c *ctrRun, h *corev1.ProbeHandler) error {
	switch {
	case h.HTTPGet != nil:
		return r.httpProbe(ctx, c, h.HTTPGet)
	case h.TCPSocket != nil:
		port, err := resolvePort(c, h.TCPSocket.Port)
		if err != nil {
			return err
		}
		host := h.TCPSocket.Host
		if host == "" {
			host = r.sb.ip
		}
		conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	case h.Exec != nil:
		return r.execProbe(ctx, c, h.Exec.Command)
	case h.GRPC != nil:
		return fmt.Errorf("gRPC probes are not supported by this node")
	}
	return fmt.Errorf("probe has no handler")
}

func (r *podRun) httpProbe(ctx context.Context, c *ctrRun, h *corev1.HTTPGetAction) error {
	port, err := resolvePort(c, h.Port)
	if err != nil {
		return err
	}
	host := h.Host
	if host == "" {
		host = r.sb.ip
	}
	scheme := strings.ToLower(string(h.Scheme))
	if scheme == "" {
		scheme = "http"
	}
	path := h.Path
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet,
		fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, strconv.Itoa(port)), path), nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "kube-probe/1.37")
	for _, hdr := range h.HTTPHeaders {
		req.Header.Set(hdr.Name, hdr.Value)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, Proxy: nil},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 10*1024))
	if resp.StatusCode < 200 || resp.StatusCode >= 400 {
		return fmt.Errorf("HTTP probe failed with statuscode: %d", resp.StatusCode)
	}
	return nil
}

func (r *podRun) execProbe(ctx context.Context, c *ctrRun, argv []string) error {
	cmd, err := r.p.runIn(ctx, r, c, argv)
	if err != nil {
		return err
	}
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return fmt.Errorf("command timed out")
	}
	if err != nil {
		return fmt.Errorf("command %q: %v: %s", strings.Join(argv, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// resolvePort turns a probe's port (a number or the name of a container port) into a number.
func resolvePort(c *ctrRun, port intstr.IntOrString) (int, error) {
	if port.Type == intstr.Int {
		return port.IntValue(), nil
	}
	for _, p := range c.spec.Ports {
		if p.Name == port.StrVal {
			return int(p.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(port.StrVal); err == nil {
		return n, nil
	}
	return 0, fmt.Errorf("container %s has no port named %q", c.spec.Name, port.StrVal)
}

// RunInContainer serves `kubectl exec` (without a TTY).
func (p *Provider) RunInContainer(ctx context.Context, namespace, podName, container string, argv []string,
	attach api.AttachIO) error {
	r, err := p.lookup(namespace, podName)
	if err != nil {
		return err
	}
	c := r.container(container)
	if c == nil {
		return errdefs.NotFoundf("container %q in pod %q not found", container, podName)
	}
	if attach.TTY() {
		return errdefs.InvalidInput("this node's containers have no TTY; run kubectl exec without -t")
	}
	cmd, err := p.runIn(ctx, r, c, argv)
	if err != nil {
		return err
	}
	cmd.Stdin = attach.Stdin()
	if out := attach.Stdout(); out != nil {
		cmd.Stdout = out
		defer out.Close()
	}
	if errOut := attach.Stderr(); errOut != nil {
		cmd.Stderr = errOut
		defer errOut.Close()
	}
	return cmd.Run()
}

// AttachToContainer would attach to a container's TTY; these containers have none.
func (p *Provider) AttachToContainer(context.Context, string, string, string, api.AttachIO) error {
	return errdefs.InvalidInput("attach is not supported by this node (its containers have no TTY); use kubectl logs -f or exec")
}

// PortForward serves `kubectl port-forward`: the stream is joined to the pod's port.
func (p *Provider) PortForward(ctx context.Context, namespace, podName string, port int32, stream io.ReadWriteCloser) error {
	r, err := p.lookup(namespace, podName)
	if err != nil {
		return err
	}
	defer stream.Close()
	conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", net.JoinHostPort(r.sb.ip, strconv.Itoa(int(port))))
	if err != nil {
		return err
	}
	defer conn.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(conn, stream); done <- struct{}{} }()
	go func() { _, _ = io.Copy(stream, conn); done <- struct{}{} }()
	select {
	case <-done:
	case <-ctx.Done():
	}
	return nil
}
