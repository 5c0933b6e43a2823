// hollow-node: one kubemark hollow kubelet, the node Kubernetes' own scale tests use
// (cmd/kubemark/app/hollow_node.go, pkg/kubemark in k8s.io/kubernetes): the upstream kubelet code
// (kubelet.NewMainKubelet through kubemark.NewHollowKubelet) with a fake CRI runtime and image
// service (k8s.io/cri-client/pkg/fake), the stub container manager and a fake cadvisor. It registers
// a Node, keeps its status and lease like any kubelet, and reports the pods bound to it Running, but
// runs nothing: it is for placement tests only.
//
// Unlike kubemark's hollow node it declares the machine it pretends to be: --cpus and --memory are
// what cadvisor's MachineInfo reports (the Node's cpu and memory capacity), --ephemeral-storage what
// the container manager reports; everything it writes is under --root-dir (kubelet state, pod logs,
// the container log links, the fake runtime's socket). Extended resources (nvidia.com/gpu, ...) are
// left to a PATCH of the Node's status, as on a real cluster (tests/kube/hollow.py).
package main

import (
	"context"
	goflag "flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	cadvisorapi "github.com/google/cadvisor/lib/model"
	"github.com/spf13/pflag"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	clientset "k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	cliflag "k8s.io/component-base/cli/flag"
	_ "k8s.io/component-base/metrics/prometheus/restclient"
	_ "k8s.io/component-base/metrics/prometheus/version"
	remote "k8s.io/cri-client/pkg"
	fakeremote "k8s.io/cri-client/pkg/fake"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet"
	cadvisortest "k8s.io/kubernetes/pkg/kubelet/cadvisor/testing"
	"k8s.io/kubernetes/pkg/kubelet/cm"
	"k8s.io/kubernetes/pkg/kubemark"
	utilflag "k8s.io/kubernetes/pkg/util/flag"
)

// machine is cadvisor's view of the pretended machine: the fake's, with the given cores and memory.
type machine struct {
	cadvisortest.Fake
	cores  int
	memory uint64
}

func (m *machine) MachineInfo(logger klog.Logger) (*cadvisorapi.MachineInfo, error) {
	info, err := m.Fake.MachineInfo(logger)
	if err != nil {
		return nil, err
	}
	info.NumCores = m.cores
	info.MemoryCapacity = m.memory
	return info, nil
}

// containerManager is the stub container manager, reporting the given ephemeral-storage capacity
// (the stub's is 0).
type containerManager struct {
	cm.ContainerManager
	ephemeralStorage resource.Quantity
}

func (c *containerManager) GetCapacity(logger klog.Logger, localStorageCapacityIsolation bool) v1.ResourceList {
	capacity := c.ContainerManager.GetCapacity(logger, localStorageCapacityIsolation)
	if localStorageCapacityIsolation {
		capacity[v1.ResourceEphemeralStorage] = c.ephemeralStorage.DeepCopy()
	}
	return capacity
}

type options struct {
	name, kubeconfig, rootDir, address, nodeIP string
	port, maxPods                              int
	cpus                                       int
	memory, ephemeralStorage                   string
	labels                                     map[string]string
	taints                                     []v1.Taint
	statusUpdate, statusReport                 time.Duration
}

func main() {
	o := options{labels: map[string]string{}}
	fs := pflag.NewFlagSet("hollow-node", pflag.ExitOnError)
	fs.StringVar(&o.name, "name", "", "the Node's name (required)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig with the node's identity, system:node:<name> (required)")
	fs.StringVar(&o.rootDir, "root-dir", "", "folder for everything this node writes (required)")
	fs.StringVar(&o.address, "address", "127.0.0.1", "address the kubelet server (plain HTTP, no auth, as kubemark's) binds")
	fs.IntVar(&o.port, "port", 10250, "port of the kubelet server; 0: no server")
	fs.StringVar(&o.nodeIP, "node-ip", "", "the Node's InternalIP (an address of this machine, not loopback); default: the kubelet's choice")
	fs.IntVar(&o.maxPods, "max-pods", 110, "the Node's pods capacity")
	fs.IntVar(&o.cpus, "cpus", 1, "CPU cores of the pretended machine: the Node's cpu capacity")
	fs.StringVar(&o.memory, "memory", "4Gi", "memory of the pretended machine: the Node's memory capacity")
	fs.StringVar(&o.ephemeralStorage, "ephemeral-storage", "0", "the Node's ephemeral-storage capacity")
	labels := cliflag.ConfigurationMap(o.labels)
	fs.Var(&labels, "node-labels", "labels of the Node (comma separated key=value)")
	fs.Var(utilflag.RegisterWithTaintsVar{Value: &o.taints}, "register-with-taints",
		"taints the Node registers with (comma separated key=value:Effect)")
	fs.DurationVar(&o.statusUpdate, "node-status-update-frequency", 10*time.Second,
		"how often the kubelet computes the Node's status (and posts it when it changed)")
	fs.DurationVar(&o.statusReport, "node-status-report-frequency", 5*time.Minute,
		"how often the kubelet posts the Node's status when it did not change")
	klogFlags := goflag.NewFlagSet("klog", goflag.ExitOnError)
	klog.InitFlags(klogFlags)
	fs.AddGoFlagSet(klogFlags)
	_ = fs.Parse(os.Args[1:])
	if o.name == "" || o.kubeconfig == "" || o.rootDir == "" {
		fmt.Fprintln(os.Stderr, "hollow-node: --name, --kubeconfig and --root-dir are required")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, o); err != nil {
		klog.ErrorS(err, "hollow-node failed")
		os.Exit(1)
	}
}

func run(ctx context.Context, o options) error {
	root, err := filepath.Abs(o.rootDir)
	if err != nil {
		return err
	}
	memory, err := resource.ParseQuantity(o.memory)
	if err != nil {
		return fmt.Errorf("--memory: %w", err)
	}
	storage, err := resource.ParseQuantity(o.ephemeralStorage)
	if err != nil {
		return fmt.Errorf("--ephemeral-storage: %w", err)
	}
	for _, dir := range []string{"tmp", "kubelet", "pod-logs", "containers"} {
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			return err
		}
	}
	// GetHollowKubeletConfig makes its folders with os.MkdirTemp: keep them under root-dir.
	if err := os.Setenv("TMPDIR", filepath.Join(root, "tmp")); err != nil {
		return err
	}
	// The kubelet's links to container logs are at a fixed host path unless this is set.
	kubelet.ContainerLogsDir = filepath.Join(root, "containers")

	f, c := kubemark.GetHollowKubeletConfig(&kubemark.HollowKubeletOptions{
		NodeName:            o.name,
		KubeletPort:         o.port,
		KubeletReadOnlyPort: 0,
		MaxPods:             o.maxPods,
		NodeLabels:          o.labels,
		RegisterWithTaints:  o.taints,
	})
	f.RootDirectory = filepath.Join(root, "kubelet")
	f.NodeIP = o.nodeIP
	c.PodLogsDir = filepath.Join(root, "pod-logs")
	c.StaticPodPath = ""
	c.EnableServer = o.port != 0
	c.Address = o.address
	c.NodeStatusUpdateFrequency.Duration = o.statusUpdate
	c.NodeStatusReportFrequency.Duration = o.statusReport

	config, err := clientcmd.BuildConfigFromFlags("", o.kubeconfig)
	if err != nil {
		return fmt.Errorf("kubeconfig %s: %w", o.kubeconfig, err)
	}
	config.UserAgent = "hollow-kubelet"
	config.ContentType = "application/vnd.kubernetes.protobuf"
	client, err := clientset.NewForConfig(config)
	if err != nil {
		return err
	}
	// As kubemark: the heartbeat client times out within a status update or a lease, unthrottled.
	heartbeat := *config
	heartbeat.Timeout = c.NodeStatusUpdateFrequency.Duration
	if lease := time.Duration(c.NodeLeaseDurationSeconds) * time.Second; heartbeat.Timeout > lease {
		heartbeat.Timeout = lease
	}
	heartbeat.QPS = -1
	heartbeatClient, err := clientset.NewForConfig(&heartbeat)
	if err != nil {
		return err
	}

	endpoint := "unix://" + filepath.Join(root, "runtime.sock")
	_ = os.Remove(filepath.Join(root, "runtime.sock"))
	runtime := fakeremote.NewFakeRemoteRuntime()
	if err := runtime.Start(endpoint); err != nil {
		return fmt.Errorf("fake runtime: %w", err)
	}
	defer runtime.Stop()
	runtimeService, err := remote.NewRemoteRuntimeServiceBuilder().
		WithEndpoint(endpoint).
		WithConnectionTimeout(15 * time.Second).
		Build(ctx)
	if err != nil {
		return fmt.Errorf("runtime service: %w", err)
	}

	hollow := kubemark.NewHollowKubelet(f, c, client, heartbeatClient,
		&machine{Fake: cadvisortest.Fake{NodeName: o.name}, cores: o.cpus, memory: uint64(memory.Value())},
		runtime.ImageService, // the fake image service: every pull succeeds
		runtimeService,
		&containerManager{ContainerManager: cm.NewStubContainerManager(), ephemeralStorage: storage},
	)
	klog.InfoS("Starting hollow kubelet", "node", o.name, "cpus", o.cpus, "memory", memory.String(),
		"ephemeralStorage", storage.String(), "rootDir", root)
	go hollow.Run(ctx) // returns only by exiting the process on a start error
	<-ctx.Done()
	klog.InfoS("Stopping hollow kubelet", "node", o.name)
	return nil
}
