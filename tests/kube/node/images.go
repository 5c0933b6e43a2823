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
}

// Image is what runs in place of one container image: the image's entrypoint, default command,
// working directory and environment, as its Dockerfile declares them, with the programs it would
// run found on PATH on this machine. Processes run as root whatever the image's USER: the
// machine's Python environment is not readable by other users.
type Image struct {
	// Repository matches an image reference by its last path component without tag or digest
	// ("nanorun-trainer" matches ghcr.io/nanorun/nanorun-trainer:0.3.0 and nanorun-trainer@sha256:…).
	Repository string            `json:"repository"`
	Entrypoint []string          `json:"entrypoint"`
	Cmd        []string          `json:"cmd"`
	WorkingDir string            `json:"workingDir"`
	Env        map[string]string `json:"env"`
	// Path is prepended to PATH: where this machine has the image's programs.
	Path []string `json:"path"`
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

// repository is the last path component of an image reference, without tag or digest.
func repository(ref string) string {
	ref, _, _ = strings.Cut(ref, "@")
	name := ref[strings.LastIndex(ref, "/")+1:]
	if i := strings.LastIndex(name, ":"); i >= 0 {
		name = name[:i]
	}
	return name
}

// Lookup finds the table entry for an image reference, or nil when this environment cannot run it.
func (t *ImageTable) Lookup(ref string) *Image {
	repo := repository(ref)
	for i := range t.Images {
		if t.Images[i].Repository == repo {
			return &t.Images[i]
		}
	}
	return nil
}

// Argv is what a container runs: Kubernetes' rules for command/args over ENTRYPOINT/CMD
// (https://kubernetes.io/docs/tasks/inject-data-application/define-command-argument-container/).
func (img *Image) Argv(command, args []string) []string {
	switch {
	case len(command) > 0:
		return append(append([]string{}, command...), args...)
	case len(args) > 0:
		return append(append([]string{}, img.Entrypoint...), args...)
	default:
		return append(append([]string{}, img.Entrypoint...), img.Cmd...)
	}
}
