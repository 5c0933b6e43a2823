package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/log"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// volumeError is a volume the node cannot provide yet (a missing ConfigMap) or at all (an
// unsupported type); the pod waits in ContainerCreating with a FailedMount event, as on a kubelet.
type volumeError struct{ msg string }

func (e *volumeError) Error() string { return e.msg }

// prepareVolumes materialises every volume of the pod under <sandbox>/volumes/<name> and starts
// the refreshers of ServiceAccount tokens. The returned map is volume name -> host path.
func (p *Provider) prepareVolumes(ctx context.Context, pod *corev1.Pod, sb *sandbox) (map[string]string, error) {
	paths := map[string]string{}
	for _, vol := range pod.Spec.Volumes {
		dir := filepath.Join(sb.dir, "volumes", vol.Name)
		src := vol.VolumeSource
		switch {
		case src.HostPath != nil:
			hp := src.HostPath
			if hp.Type != nil && (*hp.Type == corev1.HostPathDirectoryOrCreate) {
				if err := os.MkdirAll(hp.Path, 0o755); err != nil {
					return nil, err
				}
			}
			paths[vol.Name] = hp.Path
			continue
		case src.EmptyDir != nil:
			if err := os.MkdirAll(dir, 0o777); err != nil {
				return nil, err
			}
			_ = os.Chmod(dir, 0o777)
			if src.EmptyDir.Medium == corev1.StorageMediumMemory && !contains(sb.tmpfs, dir) {
				opts := "mode=1777"
				if limit := src.EmptyDir.SizeLimit; limit != nil && !limit.IsZero() {
					opts += ",size=" + strconv.FormatInt(limit.Value(), 10)
				}
				if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, opts); err != nil {
					return nil, fmt.Errorf("emptyDir %s (medium Memory): mount tmpfs: %w", vol.Name, err)
				}
				sb.tmpfs = append(sb.tmpfs, dir)
			}
		case src.ConfigMap != nil:
			if err := p.writeConfigMap(pod.Namespace, dir, src.ConfigMap.LocalObjectReference.Name,
				src.ConfigMap.Items, src.ConfigMap.DefaultMode, src.ConfigMap.Optional); err != nil {
				return nil, err
			}
		case src.Secret != nil:
			if err := p.writeSecret(pod.Namespace, dir, src.Secret.SecretName, src.Secret.Items,
				src.Secret.DefaultMode, src.Secret.Optional); err != nil {
				return nil, err
			}
		case src.DownwardAPI != nil:
			if err := p.writeDownwardAPI(pod, dir, src.DownwardAPI.Items, src.DownwardAPI.DefaultMode); err != nil {
				return nil, err
			}
		case src.Projected != nil:
			if err := p.writeProjected(ctx, pod, dir, src.Projected, true); err != nil {
				return nil, err
			}
		default:
			return nil, &volumeError{fmt.Sprintf("volume %q: this node supports emptyDir, configMap, secret, "+
				"projected, downwardAPI and hostPath volumes only", vol.Name)}
		}
		paths[vol.Name] = dir
	}
	return paths, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func fileMode(mode *int32, fallback os.FileMode) os.FileMode {
	if mode != nil {
		return os.FileMode(*mode)
	}
	return fallback
}

// writeKeys writes data (key -> bytes) into dir, all keys or the listed items. A file whose
// content is unchanged is left alone; a changed one is replaced atomically (rename), so a process
// watching the volume never reads half a file.
func writeKeys(dir string, data map[string][]byte, items []corev1.KeyToPath, defaultMode *int32, what string) error {
	mode := fileMode(defaultMode, 0o644)
	if len(items) == 0 {
		for key := range data {
			items = append(items, corev1.KeyToPath{Key: key, Path: key})
		}
	}
	for _, item := range items {
		value, ok := data[item.Key]
		if !ok {
			return &volumeError{fmt.Sprintf("%s has no key %q", what, item.Key)}
		}
		if err := writeFile(filepath.Join(dir, item.Path), value, fileMode(item.Mode, mode)); err != nil {
			return err
		}
	}
	return os.MkdirAll(dir, 0o755)
}

func writeFile(path string, value []byte, mode os.FileMode) error {
	if old, err := os.ReadFile(path); err == nil && string(old) == string(value) {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".updating"
	if err := os.WriteFile(tmp, value, mode); err != nil {
		return err
	}
	_ = os.Chmod(tmp, mode)
	return os.Rename(tmp, path)
}

// refreshVolumes keeps ConfigMap, Secret, downward API and projected volumes in step with their
// sources while the pod lives, as the kubelet's volume manager does (tokens refresh on their own).
func (p *Provider) refreshVolumes(ctx context.Context, pod *corev1.Pod, sb *sandbox, every time.Duration) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
		for _, vol := range pod.Spec.Volumes {
			dir := filepath.Join(sb.dir, "volumes", vol.Name)
			src := vol.VolumeSource
			var err error
			switch {
			case src.ConfigMap != nil:
				err = p.writeConfigMap(pod.Namespace, dir, src.ConfigMap.Name, src.ConfigMap.Items,
					src.ConfigMap.DefaultMode, src.ConfigMap.Optional)
			case src.Secret != nil:
				err = p.writeSecret(pod.Namespace, dir, src.Secret.SecretName, src.Secret.Items,
					src.Secret.DefaultMode, src.Secret.Optional)
			case src.DownwardAPI != nil:
				err = p.writeDownwardAPI(pod, dir, src.DownwardAPI.Items, src.DownwardAPI.DefaultMode)
			case src.Projected != nil:
				err = p.writeProjected(ctx, pod, dir, src.Projected, false)
			}
			if err != nil {
				log.G(ctx).WithError(err).Debugf("refreshing volume %s of %s", vol.Name, describe(pod))
			}
		}
	}
}

func (p *Provider) configMapData(namespace, name string, optional *bool) (map[string][]byte, error) {
	cm, err := p.configMaps.ConfigMaps(namespace).Get(name)
	if errors.IsNotFound(err) && optional != nil && *optional {
		return map[string][]byte{}, nil
	}
	if err != nil {
		return nil, &volumeError{fmt.Sprintf("configmap %q not found", name)}
	}
	data := map[string][]byte{}
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return data, nil
}

func (p *Provider) secretData(namespace, name string, optional *bool) (map[string][]byte, error) {
	secret, err := p.secrets.Secrets(namespace).Get(name)
	if errors.IsNotFound(err) && optional != nil && *optional {
		return map[string][]byte{}, nil
	}
	if err != nil {
		return nil, &volumeError{fmt.Sprintf("secret %q not found", name)}
	}
	return secret.Data, nil
}

func (p *Provider) writeConfigMap(ns, dir, name string, items []corev1.KeyToPath, mode *int32, optional *bool) error {
	data, err := p.configMapData(ns, name, optional)
	if err != nil {
		return err
	}
	return writeKeys(dir, data, items, mode, "configmap "+name)
}

func (p *Provider) writeSecret(ns, dir, name string, items []corev1.KeyToPath, mode *int32, optional *bool) error {
	data, err := p.secretData(ns, name, optional)
	if err != nil {
		return err
	}
	return writeKeys(dir, data, items, mode, "secret "+name)
}

func (p *Provider) writeDownwardAPI(pod *corev1.Pod, dir string, items []corev1.DownwardAPIVolumeFile, mode *int32) error {
	data := map[string][]byte{}
	var paths []corev1.KeyToPath
	for _, item := range items {
		var value string
		var err error
		switch {
		case item.FieldRef != nil:
			value, err = fieldValue(pod, item.FieldRef.FieldPath)
		case item.ResourceFieldRef != nil:
			value, err = p.resourceValue(pod, "", item.ResourceFieldRef)
		}
		if err != nil {
			return &volumeError{err.Error()}
		}
		data[item.Path] = []byte(value)
		paths = append(paths, corev1.KeyToPath{Key: item.Path, Path: item.Path, Mode: item.Mode})
	}
	return writeKeys(dir, data, paths, mode, "downwardAPI")
}

// writeProjected writes a projected volume; withTokens also requests its ServiceAccount tokens
// (once, at pod start: they refresh on their own).
func (p *Provider) writeProjected(ctx context.Context, pod *corev1.Pod, dir string, proj *corev1.ProjectedVolumeSource,
	withTokens bool) error {
	for _, source := range proj.Sources {
		switch {
		case source.ConfigMap != nil:
			if err := p.writeConfigMap(pod.Namespace, dir, source.ConfigMap.Name, source.ConfigMap.Items,
				proj.DefaultMode, source.ConfigMap.Optional); err != nil {
				return err
			}
		case source.Secret != nil:
			if err := p.writeSecret(pod.Namespace, dir, source.Secret.Name, source.Secret.Items,
				proj.DefaultMode, source.Secret.Optional); err != nil {
				return err
			}
		case source.DownwardAPI != nil:
			if err := p.writeDownwardAPI(pod, dir, source.DownwardAPI.Items, proj.DefaultMode); err != nil {
				return err
			}
		case source.ServiceAccountToken != nil && withTokens:
			if err := p.writeToken(ctx, pod, dir, source.ServiceAccountToken, proj.DefaultMode); err != nil {
				return err
			}
		case source.ClusterTrustBundle != nil || source.PodCertificate != nil:
			return &volumeError{"projected clusterTrustBundle and podCertificate sources are not supported on this node"}
		}
	}
	return nil
}

// writeToken asks the API server for a token bound to the pod (TokenRequest, as the kubelet does)
// and rewrites it when 80% of its lifetime has passed, until the pod is gone.
func (p *Provider) writeToken(ctx context.Context, pod *corev1.Pod, dir string,
	src *corev1.ServiceAccountTokenProjection, mode *int32) error {
	expiration := int64(3607)
	if src.ExpirationSeconds != nil {
		expiration = *src.ExpirationSeconds
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	request := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		ExpirationSeconds: &expiration,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}
	if src.Audience != "" {
		request.Spec.Audiences = []string{src.Audience}
	}
	write := func() (time.Duration, error) {
		token, err := p.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, request, metav1.CreateOptions{})
		if err != nil {
			return 0, fmt.Errorf("serviceaccount %s/%s token: %w", pod.Namespace, sa, err)
		}
		err = writeKeys(dir, map[string][]byte{src.Path: []byte(token.Status.Token)},
			[]corev1.KeyToPath{{Key: src.Path, Path: src.Path}}, mode, "token")
		lifetime := time.Until(token.Status.ExpirationTimestamp.Time)
		return lifetime * 8 / 10, err
	}
	refresh, err := write()
	if err != nil {
		return err
	}
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(refresh):
			}
			next, err := write()
			if err != nil {
				log.G(ctx).WithError(err).Warn("token refresh failed; retrying in 10s")
				next = 10 * time.Second
			}
			refresh = next
		}
	}()
	return nil
}
