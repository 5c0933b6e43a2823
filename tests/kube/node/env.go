package main

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/labels"
)

// containerEnv is the environment the kubelet gives a container
// (https://kubernetes.io/docs/tasks/inject-data-application/environment-variable-expose-pod-information/):
// the image's ENV, service links, envFrom, then env with $(VAR) expansion and valueFrom.
func (p *Provider) containerEnv(pod *corev1.Pod, c *corev1.Container, img *Image, podIP string) ([]string, error) {
	env := map[string]string{}
	var order []string
	set := func(k, v string) {
		if _, ok := env[k]; !ok {
			order = append(order, k)
		}
		env[k] = v
	}
	keys := make([]string, 0, len(img.Env))
	for k := range img.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		set(k, img.Env[k])
	}
	set("HOSTNAME", podHostname(pod))
	for k, v := range p.serviceEnv(pod) {
		set(k, v)
	}
	for _, from := range c.EnvFrom {
		var data map[string][]byte
		var err error
		switch {
		case from.ConfigMapRef != nil:
			data, err = p.configMapData(pod.Namespace, from.ConfigMapRef.Name, from.ConfigMapRef.Optional)
		case from.SecretRef != nil:
			data, err = p.secretData(pod.Namespace, from.SecretRef.Name, from.SecretRef.Optional)
		}
		if err != nil {
			return nil, err
		}
		for k, v := range data {
			set(from.Prefix+k, string(v))
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			set(e.Name, expand(e.Value, env))
			continue
		}
		value, err := p.valueFrom(pod, c, e.ValueFrom, podIP)
		if err != nil {
			return nil, fmt.Errorf("env %s: %w", e.Name, err)
		}
		if value != nil {
			set(e.Name, *value)
		}
	}
	// PATH: the image's programs first (their place on this machine), then the image's PATH.
	path := env["PATH"]
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	if len(img.Path) > 0 {
		set("PATH", strings.Join(img.Path, ":")+":"+path)
	}
	out := make([]string, 0, len(order))
	for _, k := range order {
		out = append(out, k+"="+env[k])
	}
	return out, nil
}

func (p *Provider) valueFrom(pod *corev1.Pod, c *corev1.Container, src *corev1.EnvVarSource, podIP string) (*string, error) {
	switch {
	case src.ConfigMapKeyRef != nil:
		ref := src.ConfigMapKeyRef
		data, err := p.configMapData(pod.Namespace, ref.Name, ref.Optional)
		return keyValue(data, err, "configmap", ref.Name, ref.Key, ref.Optional)
	case src.SecretKeyRef != nil:
		ref := src.SecretKeyRef
		data, err := p.secretData(pod.Namespace, ref.Name, ref.Optional)
		return keyValue(data, err, "secret", ref.Name, ref.Key, ref.Optional)
	case src.FieldRef != nil:
		if src.FieldRef.FieldPath == "status.podIP" || src.FieldRef.FieldPath == "status.podIPs" {
			return &podIP, nil
		}
		v, err := fieldValue(pod, src.FieldRef.FieldPath)
		return &v, err
	case src.ResourceFieldRef != nil:
		v, err := p.resourceValue(pod, c.Name, src.ResourceFieldRef)
		return &v, err
	}
	return nil, fmt.Errorf("unsupported valueFrom")
}

// keyValue is one key of a ConfigMap's or Secret's data; nil when an optional key is missing.
func keyValue(data map[string][]byte, err error, kind, name, key string, optional *bool) (*string, error) {
	if err != nil {
		return nil, err
	}
	if v, ok := data[key]; ok {
		s := string(v)
		return &s, nil
	}
	if optional != nil && *optional {
		return nil, nil
	}
	return nil, fmt.Errorf("%s %q has no key %q", kind, name, key)
}

// fieldValue resolves a downward-API fieldPath.
func fieldValue(pod *corev1.Pod, path string) (string, error) {
	if strings.HasPrefix(path, "metadata.labels['") || strings.HasPrefix(path, "metadata.annotations['") {
		key := path[strings.Index(path, "['")+2 : len(path)-2]
		if strings.HasPrefix(path, "metadata.labels") {
			return pod.Labels[key], nil
		}
		return pod.Annotations[key], nil
	}
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "metadata.labels":
		return formatMap(pod.Labels), nil
	case "metadata.annotations":
		return formatMap(pod.Annotations), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.hostIP", "status.hostIPs":
		return pod.Status.HostIP, nil
	case "status.podIP", "status.podIPs":
		return pod.Status.PodIP, nil
	}
	return "", fmt.Errorf("unsupported fieldPath %q", path)
}

func formatMap(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	lines := make([]string, len(keys))
	for i, k := range keys {
		lines[i] = fmt.Sprintf("%s=%q", k, m[k])
	}
	return strings.Join(lines, "\n")
}

// resourceValue resolves a resourceFieldRef: the container's request or limit, a limit defaulting
// to the node's allocatable, rounded up in units of the divisor (as the kubelet does).
func (p *Provider) resourceValue(pod *corev1.Pod, container string, ref *corev1.ResourceFieldSelector) (string, error) {
	if ref.ContainerName != "" {
		container = ref.ContainerName
	}
	var c *corev1.Container
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == container {
			c = &pod.Spec.Containers[i]
		}
	}
	if c == nil {
		return "", fmt.Errorf("resourceFieldRef: no container %q", container)
	}
	kind, name, ok := strings.Cut(ref.Resource, ".")
	if !ok {
		return "", fmt.Errorf("resourceFieldRef: unsupported resource %q", ref.Resource)
	}
	var q resource.Quantity
	var found bool
	if kind == "limits" {
		q, found = c.Resources.Limits[corev1.ResourceName(name)]
		if !found {
			q, found = p.allocatable[corev1.ResourceName(name)]
		}
	} else {
		q, found = c.Resources.Requests[corev1.ResourceName(name)]
	}
	divisor := ref.Divisor
	if divisor.IsZero() {
		divisor = resource.MustParse("1")
	}
	if !found {
		return "0", nil
	}
	if name == "cpu" {
		return strconv.FormatInt(int64(math.Ceil(float64(q.MilliValue())/float64(divisor.MilliValue()))), 10), nil
	}
	return strconv.FormatInt(int64(math.Ceil(float64(q.Value())/float64(divisor.Value()))), 10), nil
}

// serviceEnv is the Docker-links style variables of the services in the pod's namespace
// (enableServiceLinks, default true) and the master service's in every namespace.
func (p *Provider) serviceEnv(pod *corev1.Pod) map[string]string {
	env := map[string]string{}
	add := func(svc *corev1.Service) {
		if svc.Spec.ClusterIP == "" || svc.Spec.ClusterIP == corev1.ClusterIPNone || len(svc.Spec.Ports) == 0 {
			return
		}
		prefix := strings.ToUpper(strings.ReplaceAll(svc.Name, "-", "_"))
		first := svc.Spec.Ports[0]
		env[prefix+"_SERVICE_HOST"] = svc.Spec.ClusterIP
		env[prefix+"_SERVICE_PORT"] = strconv.Itoa(int(first.Port))
		env[prefix+"_PORT"] = fmt.Sprintf("%s://%s:%d", strings.ToLower(string(first.Protocol)), svc.Spec.ClusterIP, first.Port)
		for _, port := range svc.Spec.Ports {
			if port.Name != "" {
				env[prefix+"_SERVICE_PORT_"+strings.ToUpper(strings.ReplaceAll(port.Name, "-", "_"))] = strconv.Itoa(int(port.Port))
			}
			proto := strings.ToUpper(string(port.Protocol))
			key := fmt.Sprintf("%s_PORT_%d_%s", prefix, port.Port, proto)
			env[key] = fmt.Sprintf("%s://%s:%d", strings.ToLower(proto), svc.Spec.ClusterIP, port.Port)
			env[key+"_PROTO"] = strings.ToLower(proto)
			env[key+"_PORT"] = strconv.Itoa(int(port.Port))
			env[key+"_ADDR"] = svc.Spec.ClusterIP
		}
	}
	links := pod.Spec.EnableServiceLinks == nil || *pod.Spec.EnableServiceLinks
	if links {
		if services, err := p.services.Services(pod.Namespace).List(labels.Everything()); err == nil {
			for _, svc := range services {
				add(svc)
			}
		}
	}
	if master, err := p.services.Services("default").Get("kubernetes"); err == nil {
		add(master)
	}
	return env
}

// expandAll expands each string (a container's command or args) with expand.
func expandAll(in []string, env map[string]string) []string {
	if in == nil {
		return nil
	}
	out := make([]string, len(in))
	for i, s := range in {
		out[i] = expand(s, env)
	}
	return out
}

// expand replaces $(VAR) with earlier variables; $$ escapes, unknown references stay as written
// (https://kubernetes.io/docs/tasks/inject-data-application/define-interdependent-environment-variables/).
func expand(s string, env map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 >= len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
		case '(':
			end := strings.IndexByte(s[i+2:], ')')
			if end < 0 {
				b.WriteString(s[i:])
				return b.String()
			}
			name := s[i+2 : i+2+end]
			if v, ok := env[name]; ok {
				b.WriteString(v)
			} else {
				b.WriteString("$(" + name + ")")
			}
			i += 2 + end
		default:
			b.WriteByte('$')
		}
	}
	return b.String()
}
