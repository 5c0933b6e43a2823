// nanorun-node: a Kubernetes node for the test cluster, built on virtual-kubelet
// (https://github.com/virtual-kubelet/virtual-kubelet). virtual-kubelet registers the Node, renews
// its Lease, syncs pod status and serves the kubelet HTTP API (logs, exec, port-forward); the
// provider in this module runs each pod bound to the node as local processes:
//
//   - every pod gets a network namespace with its own IP on a Linux bridge (veth pair), a cluster
//     resolv.conf and /etc/hosts (bind-mounted by `ip netns exec`), its own UTS namespace (hostname)
//     and a private mount namespace in which its volumes, /tmp and working directory are mounted;
//   - an image is run only when the image table (--images) maps it to something runnable on this
//     machine; any other image fails the way a kubelet reports an image it cannot pull;
//   - what a kubelet does for a container, the provider does: env (valueFrom, envFrom, service
//     links), volumes (projected ServiceAccount token, ConfigMap, Secret, downward API, emptyDir incl.
//     medium Memory, hostPath), restartPolicy with back-off, probes (HTTP, TCP, exec), exit codes and
//     reasons, logs (current and previous), SIGTERM then SIGKILL after the grace period.
//
// The container runtime is the only thing substituted: there are no images, cgroups or resource
// limits; a pod that requests GPUs runs on the CPU.
//
// Usage: nanorun-node run --name N --kubeconfig K ... (see flags); `nanorun-node init SPEC` and
// `nanorun-node exec SPEC` are the in-namespace helpers the provider starts itself.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/virtual-kubelet/virtual-kubelet/log"
	logruslogger "github.com/virtual-kubelet/virtual-kubelet/log/logrus"
	"github.com/virtual-kubelet/virtual-kubelet/node"
	"github.com/virtual-kubelet/virtual-kubelet/node/nodeutil"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apiserver/pkg/server/dynamiccertificates"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
)

// kubeletVersion is what the Node reports; the test cluster's control plane is this release.
const kubeletVersion = "v1.37.1"

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "init":
			os.Exit(initMain(os.Args[2:]))
		case "exec":
			os.Exit(execMain(os.Args[2:]))
		case "run":
			os.Exit(runMain(os.Args[2:]))
		}
	}
	fmt.Fprintln(os.Stderr, "usage: nanorun-node run [flags] | init SPEC | exec SPEC")
	os.Exit(2)
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func runMain(args []string) int {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	var cfg Config
	var labels, taints listFlag
	var capacity, kubeconfig, listen, tlsCert, tlsKey, clientCA string
	fs.StringVar(&cfg.NodeName, "name", "node-1", "Node name")
	fs.StringVar(&kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the node's identity (system:node:<name>)")
	fs.StringVar(&listen, "listen", "0.0.0.0:10250", "address of the kubelet HTTP API (logs, exec, port-forward)")
	fs.StringVar(&tlsCert, "tls-cert", "", "serving certificate of the kubelet API")
	fs.StringVar(&tlsKey, "tls-key", "", "key of --tls-cert")
	fs.StringVar(&clientCA, "client-ca", "", "CA of the client certificates the kubelet API accepts (the API server's)")
	fs.StringVar(&cfg.NodeIP, "node-ip", "", "InternalIP of the Node (the bridge address: pods and the API server reach it)")
	fs.StringVar(&capacity, "capacity", "cpu=96,memory=1Ti,pods=110,nvidia.com/gpu=8", "declared capacity, name=quantity,...")
	fs.Var(&labels, "label", "node label key=value (repeatable)")
	fs.Var(&taints, "taint", "node taint key=value:Effect (repeatable)")
	fs.StringVar(&cfg.StateDir, "state-dir", "", "where pod sandboxes (volumes, logs, working dirs) live")
	fs.StringVar(&cfg.ImagesFile, "images", "", "image table (YAML): which images run here and how")
	fs.StringVar(&cfg.Bridge, "bridge", "nanorun0", "Linux bridge the pod veths attach to")
	fs.StringVar(&cfg.PodCIDR, "pod-cidr", "", "this node's pod addresses, e.g. 10.244.1.0/24")
	fs.StringVar(&cfg.Gateway, "gateway", "", "pods' default gateway (the bridge address)")
	fs.StringVar(&cfg.ClusterDNS, "cluster-dns", "", "nameserver of pods with dnsPolicy ClusterFirst")
	fs.StringVar(&cfg.ClusterDomain, "cluster-domain", "cluster.local", "cluster DNS domain")
	fs.StringVar(&cfg.NetnsPrefix, "netns-prefix", "nrpod-", "prefix of the pods' network namespace names")
	fs.Var((*listFlag)(&cfg.HostPaths), "host-path", "a folder of this machine the images' programs use (the checkout, "+
		"its Python environment, the built binaries): containers see it at the same place even where their own "+
		"/tmp hides it (repeatable)")
	fs.DurationVar(&cfg.BackoffBase, "restart-backoff", 10*time.Second, "first container restart back-off (doubles up to 5m, as the kubelet's)")
	verbose := fs.Bool("v", false, "debug logging")
	_ = fs.Parse(args)

	logger := logrus.StandardLogger()
	if *verbose {
		logger.SetLevel(logrus.DebugLevel)
	}
	log.L = logruslogger.FromLogrus(logrus.NewEntry(logger))
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()

	if err := serve(ctx, &cfg, kubeconfig, listen, tlsCert, tlsKey, clientCA, capacity, labels, taints); err != nil {
		log.G(ctx).WithError(err).Error("node agent failed")
		return 1
	}
	return 0
}

func serve(ctx context.Context, cfg *Config, kubeconfig, listen, tlsCert, tlsKey, clientCA, capacity string,
	labels, taints []string) error {
	restCfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
	}
	restCfg.QPS, restCfg.Burst = 50, 100
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return err
	}
	if cfg.Images, err = loadImageTable(cfg.ImagesFile); err != nil {
		return err
	}
	nodeSpec, err := nodeObject(cfg, listen, capacity, labels, taints)
	if err != nil {
		return err
	}

	broadcaster := record.NewBroadcaster()
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "kubelet", Host: cfg.NodeName})

	caContent, err := dynamiccertificates.NewDynamicCAContentFromFile("client-ca", clientCA)
	if err != nil {
		return fmt.Errorf("client CA: %w", err)
	}
	auth, err := nodeutil.WebhookAuth(client, cfg.NodeName, func(c *nodeutil.WebhookAuthConfig) error {
		c.AuthnConfig.ClientCertificateCAContentProvider = caContent
		return nil
	})
	if err != nil {
		return err
	}

	var provider *Provider
	newProvider := func(pc nodeutil.ProviderConfig) (nodeutil.Provider, node.NodeProvider, error) {
		provider, err = NewProvider(ctx, cfg, client, recorder, pc)
		return provider, nil, err
	}
	mux := http.NewServeMux()
	n, err := nodeutil.NewNode(cfg.NodeName, newProvider,
		nodeutil.WithClient(client),
		func(c *nodeutil.NodeConfig) error {
			c.NodeSpec = *nodeSpec
			c.HTTPListenAddr = listen
			c.Handler = nodeutil.WithAuth(auth, mux)
			c.EventRecorder = recorder
			// DeletePod holds a worker for the pod's grace period: room for many at once.
			c.NumWorkers = 64
			// The provider resolves env itself (resourceFieldRef and service links included).
			c.SkipDownwardAPIResolution = true
			return nil
		},
		nodeutil.AttachProviderRoutes(mux),
		nodeutil.WithTLSConfig(nodeutil.WithKeyPairFromPath(tlsCert, tlsKey), nodeutil.WithCAFromPath(clientCA)),
	)
	if err != nil {
		return err
	}
	broadcaster.StartRecordingToSink(&corev1client.EventSinkImpl{Interface: client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	go caContent.Run(ctx, 1)

	go func() {
		if err := n.WaitReady(ctx, 0); err == nil {
			log.G(ctx).Infof("node %s ready", cfg.NodeName)
		}
	}()
	err = n.Run(ctx)
	if provider != nil {
		provider.Shutdown()
	}
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// nodeObject is the Node as registered: declared capacity, labels, taints, the kubelet endpoint.
func nodeObject(cfg *Config, listen, capacity string, labels, taints []string) (*corev1.Node, error) {
	resources := corev1.ResourceList{}
	for _, item := range strings.Split(capacity, ",") {
		name, qty, ok := strings.Cut(strings.TrimSpace(item), "=")
		if !ok {
			return nil, fmt.Errorf("--capacity: %q is not name=quantity", item)
		}
		q, err := resource.ParseQuantity(qty)
		if err != nil {
			return nil, fmt.Errorf("--capacity %s: %w", name, err)
		}
		resources[corev1.ResourceName(name)] = q
	}
	nodeLabels := map[string]string{
		"kubernetes.io/hostname": cfg.NodeName,
		"kubernetes.io/os":       "linux",
		"kubernetes.io/arch":     "amd64",
		"type":                   "virtual-kubelet",
	}
	for _, l := range labels {
		k, v, _ := strings.Cut(l, "=")
		nodeLabels[k] = v
	}
	var nodeTaints []corev1.Taint
	for _, t := range taints {
		kv, effect, ok := strings.Cut(t, ":")
		if !ok {
			return nil, fmt.Errorf("--taint %q: want key=value:Effect", t)
		}
		k, v, _ := strings.Cut(kv, "=")
		nodeTaints = append(nodeTaints, corev1.Taint{Key: k, Value: v, Effect: corev1.TaintEffect(effect)})
	}
	_, port, err := splitPort(listen)
	if err != nil {
		return nil, err
	}
	now := metav1.Now()
	condition := func(t corev1.NodeConditionType, status corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: status, Reason: reason, Message: msg,
			LastHeartbeatTime: now, LastTransitionTime: now}
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: cfg.NodeName, Labels: nodeLabels},
		Spec:       corev1.NodeSpec{Taints: nodeTaints, PodCIDR: cfg.PodCIDR, PodCIDRs: []string{cfg.PodCIDR}},
		Status: corev1.NodeStatus{
			Phase:       corev1.NodePending,
			Capacity:    resources,
			Allocatable: resources.DeepCopy(),
			Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeInternalIP, Address: cfg.NodeIP},
				{Type: corev1.NodeHostName, Address: cfg.NodeName},
			},
			DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: port}},
			NodeInfo: corev1.NodeSystemInfo{
				KubeletVersion: kubeletVersion, OperatingSystem: "linux", Architecture: "amd64", KernelVersion: kernelRelease(),
				ContainerRuntimeVersion: "nanorun-process://1", OSImage: "nanorun test node (virtual-kubelet)",
			},
			Conditions: []corev1.NodeCondition{
				condition(corev1.NodeReady, corev1.ConditionFalse, "KubeletNotReady", "starting"),
				condition(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", "no memory pressure"),
				condition(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", "no disk pressure"),
				condition(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", "no PID pressure"),
				condition(corev1.NodeNetworkUnavailable, corev1.ConditionFalse, "RouteCreated", "pods are on the node's bridge"),
			},
		},
	}, nil
}

// splitPort is the host and port of a listen address.
func splitPort(addr string) (string, int32, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("--listen %q: %w", addr, err)
	}
	n, err := strconv.ParseInt(port, 10, 32)
	if err != nil {
		return "", 0, fmt.Errorf("--listen %q: %w", addr, err)
	}
	return host, int32(n), nil
}

func kernelRelease() string {
	var u syscall.Utsname
	if syscall.Uname(&u) != nil {
		return ""
	}
	b := make([]byte, 0, len(u.Release))
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}
