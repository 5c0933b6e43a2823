package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// processSpec is what the in-namespace helper sets up before it becomes the container's process.
// `init` runs inside the pod's fresh mount and UTS namespaces (made by `ip netns exec` and
// `unshare --uts`); `exec` runs inside a running container's namespaces (entered with nsenter).
type processSpec struct {
	Hostname   string      `json:"hostname,omitempty"`
	Mounts     []mountSpec `json:"mounts,omitempty"`
	WorkingDir string      `json:"workingDir,omitempty"`
	Argv       []string    `json:"argv"`
}

type mountSpec struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly,omitempty"`
}

// readSpec reads the spec from a file (init) or, for exec, from the argument itself: inside a
// running container the node's files may be hidden by the container's own mounts.
func readSpec(args []string) (*processSpec, error) {
	if len(args) != 1 {
		return nil, fmt.Errorf("usage: nanorun-node init SPEC.json | exec JSON")
	}
	raw := []byte(args[0])
	if !strings.HasPrefix(args[0], "{") {
		var err error
		if raw, err = os.ReadFile(args[0]); err != nil {
			return nil, err
		}
	}
	var spec processSpec
	if err := json.Unmarshal(raw, &spec); err != nil {
		return nil, fmt.Errorf("%s: %w", args[0], err)
	}
	if len(spec.Argv) == 0 {
		return nil, fmt.Errorf("%s: no command", args[0])
	}
	return &spec, nil
}

// initMain mounts the container's volumes, sets its hostname and working directory, then execs
// its command (this process becomes the container's main process: signals reach it directly).
func initMain(args []string) int {
	spec, err := readSpec(args)
	if err != nil {
		return fail(err)
	}
	if spec.Hostname != "" {
		if err := syscall.Sethostname([]byte(spec.Hostname)); err != nil {
			return fail(fmt.Errorf("sethostname: %w", err))
		}
	}
	// Every source is opened before the first mount, and mounted through /proc/self/fd: a mount
	// (the pod's /tmp) may hide the folder the later sources are in.
	sources := make([]*os.File, len(spec.Mounts))
	for i, m := range spec.Mounts {
		f, err := os.OpenFile(m.Source, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			return fail(fmt.Errorf("mount %s: %w", m.Target, err))
		}
		sources[i] = f
	}
	for i, m := range spec.Mounts {
		if err := bindMount(m, sources[i]); err != nil {
			return fail(err)
		}
	}
	return execInto(spec)
}

// execMain runs a command in a running container (kubectl exec, exec probes): same environment
// (passed by the caller), the container's working directory.
func execMain(args []string) int {
	spec, err := readSpec(args)
	if err != nil {
		return fail(err)
	}
	return execInto(spec)
}

func execInto(spec *processSpec) int {
	if spec.WorkingDir != "" {
		if err := os.Chdir(spec.WorkingDir); err != nil {
			return fail(fmt.Errorf("working directory: %w", err))
		}
	}
	path, err := exec.LookPath(spec.Argv[0]) // PATH is the container's
	if err != nil {
		// As a container runtime reports it: the process never started (exit 127 like a shell).
		fmt.Fprintf(os.Stderr, "exec: %q: executable file not found in $PATH\n", spec.Argv[0])
		return 127
	}
	err = syscall.Exec(path, spec.Argv, os.Environ())
	return fail(fmt.Errorf("exec %s: %w", path, err))
}

// bindMount makes m.Target show m.Source (opened as source: a directory or a file), read-only
// when asked.
func bindMount(m mountSpec, source *os.File) error {
	info, err := source.Stat()
	if err != nil {
		return fmt.Errorf("mount %s: %w", m.Target, err)
	}
	if info.IsDir() {
		err = os.MkdirAll(m.Target, 0o755)
	} else if err = os.MkdirAll(filepath.Dir(m.Target), 0o755); err == nil {
		var f *os.File
		if f, err = os.OpenFile(m.Target, os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			f.Close()
		}
	}
	if err != nil {
		return fmt.Errorf("mount point %s: %w", m.Target, err)
	}
	from := fmt.Sprintf("/proc/self/fd/%d", source.Fd())
	if err := syscall.Mount(from, m.Target, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s on %s: %w", m.Source, m.Target, err)
	}
	if m.ReadOnly {
		flags := uintptr(syscall.MS_BIND | syscall.MS_REMOUNT | syscall.MS_RDONLY | syscall.MS_REC)
		if err := syscall.Mount("", m.Target, "", flags, ""); err != nil {
			return fmt.Errorf("read-only %s: %w", m.Target, err)
		}
	}
	return nil
}

func fail(err error) int {
	fmt.Fprintf(os.Stderr, "nanorun-node: %v\n", err)
	return 128 // what a container runtime reports for a container that could not start
}
