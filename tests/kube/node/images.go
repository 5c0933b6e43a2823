package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// Config is the node agent's configuration (flags of `nanorun-node run`).
type Config struct {
	NodeName      string
	NodeIP        string
	StateDir      string
	ImagesFile    string
	Images        *ImageTable
	Bridge        string
	PodCIDR       string
	Gateway       string
	ClusterDNS    string
	ClusterDomain string
	NetnsPrefix   string
	BackoffBase   time.Duration
	HostPaths     []string
}

// Image is what runs in place of one container image: the image's entrypoint, default command,
// working directory and environment, as its Dockerfile declares them, with the programs it would
// run found on PATH on this machine. Processes run as root whatever the image's USER: the
// machine's Python environment is not readable by other users.
type Image struct {
	// Repository matches an image reference, without registry, tag or digest, by its last path
	// components ("nanorun-trainer" matches ghcr.io/nanorun/nanorun-trainer:0.3.0 and
	// nanorun-trainer@sha256:…; "kuberay/operator" matches quay.io/kuberay/operator:v1.6.1).
	Repository string            `json:"repository"`
	Entrypoint []string          `json:"entrypoint"`
	Cmd        []string          `json:"cmd"`
	WorkingDir string            `json:"workingDir"`
	Env        map[string]string `json:"env"`
	// Path is prepended to PATH: where this machine has the image's programs.
	Path []string `json:"path"`
	// Executables maps absolute paths of programs inside the image (a command such as /manager)
	// to the files that run in their place.
	Executables map[string]string `json:"executables"`
	// Files maps files of the image's filesystem (absolute paths) that differ from this machine's
	// to the files mounted there in the container.
	Files map[string]string `json:"files"`
}

// ImageTable maps the images this environment can run to what runs instead.
type ImageTable struct {
	Images []Image `json:"images"`
}

func loadImageTable(path string) (*ImageTable, error) {
	if path == "" {
		return &ImageTable{}, nil
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("image table: %w", err)
	}
	var table ImageTable
	if err := yaml.UnmarshalStrict([]byte(os.ExpandEnv(string(raw))), &table); err != nil {
		return nil, fmt.Errorf("image table %s: %w", path, err)
	}
	for _, img := range table.Images {
		if img.Repository == "" {
			return nil, fmt.Errorf("image table %s: an entry has no repository", path)
		}
	}
	return &table, nil
}

// repository is an image reference without tag or digest.
func repository(ref string) string {
	ref, _, _ = strings.Cut(ref, "@")
	slash := strings.LastIndex(ref, "/")
	if i := strings.LastIndex(ref, ":"); i > slash {
		ref = ref[:i]
	}
	return ref
}

// Lookup finds the table entry for an image reference, or nil when this environment cannot run it.
func (t *ImageTable) Lookup(ref string) *Image {
	repo := repository(ref)
	for i := range t.Images {
		if want := t.Images[i].Repository; repo == want || strings.HasSuffix(repo, "/"+want) {
			return &t.Images[i]
		}
	}
	return nil
}

// Argv is what a container runs: Kubernetes' rules for command/args over ENTRYPOINT/CMD
// (https://kubernetes.io/docs/tasks/inject-data-application/define-command-argument-container/).
// The program is then looked up in Executables.
func (img *Image) Argv(command, args []string) []string {
	var argv []string
	switch {
	case len(command) > 0:
		argv = append(append([]string{}, command...), args...)
	case len(args) > 0:
		argv = append(append([]string{}, img.Entrypoint...), args...)
	default:
		argv = append(append([]string{}, img.Entrypoint...), img.Cmd...)
	}
	if len(argv) > 0 {
		if local, ok := img.Executables[argv[0]]; ok {
			argv[0] = local
		}
	}
	return argv
}
