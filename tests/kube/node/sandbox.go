package main

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	corev1 "k8s.io/api/core/v1"
)

// sandbox is what a pod's containers share: a network namespace with one veth on the bridge (or
// the host's network for hostNetwork pods), the files `ip netns exec` bind-mounts over /etc
// (resolv.conf, hosts), the volumes and a private /tmp.
type sandbox struct {
	dir       string // <state>/pods/<uid>: volumes/, tmp/, containers/, logs/
	netns     string // network namespace name; "" for hostNetwork pods
	veth      string // host end of the veth pair
	ip        string
	ipHeld    bool // ip is this pod's until teardownNetwork gives it back (hostNetwork pods hold none)
	hostname  string
	tmpfs     []string // tmpfs mounts (emptyDir medium: Memory) to unmount at teardown
	networkUp bool
}

// ipam hands out the node's pod addresses (its PodCIDR, without network, gateway and broadcast).
type ipam struct {
	mu     sync.Mutex
	prefix netip.Prefix
	used   map[netip.Addr]bool
	last   netip.Addr // the address handed out last: allocation goes on after it
}

func newIPAM(cidr string) (*ipam, error) {
	prefix, err := netip.ParsePrefix(cidr)
	if err != nil {
		return nil, fmt.Errorf("--pod-cidr %q: %w", cidr, err)
	}
	return &ipam{prefix: prefix.Masked(), used: map[netip.Addr]bool{}}, nil
}

func (a *ipam) allocate() (netip.Addr, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	// Round robin from the last address handed out, as the host-local CNI plugin allocates: an
	// address just released is not reused at once, while its old owner's MAC may still sit in
	// other pods' neighbour caches and conntrack.
	first := a.prefix.Addr().Next().Next() // .0 is the network, .1 stays free for a gateway
	usable := func(addr netip.Addr) bool { // the last address is broadcast
		return a.prefix.Contains(addr) && a.prefix.Contains(addr.Next())
	}
	start := first
	if a.last.IsValid() && usable(a.last.Next()) {
		start = a.last.Next()
	}
	for _, from := range []netip.Addr{start, first} {
		for addr := from; usable(addr); addr = addr.Next() {
			if !a.used[addr] {
				a.used[addr] = true
				a.last = addr
				return addr, nil
			}
		}
	}
	return netip.Addr{}, fmt.Errorf("no free pod address in %s", a.prefix)
}

func (a *ipam) release(ip string) {
	if addr, err := netip.ParseAddr(ip); err == nil {
		a.mu.Lock()
		delete(a.used, addr)
		a.mu.Unlock()
	}
}

// releaseHeld gives back the address a sandbox holds, once. A pod that finished on its own is torn
// down again when it is deleted, and by then its address may be another pod's: releasing it twice
// would hand it to a third pod, and two pods would answer on one address.
func (a *ipam) releaseHeld(sb *sandbox) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !sb.ipHeld {
		return
	}
	if addr, err := netip.ParseAddr(sb.ip); err == nil {
		delete(a.used, addr)
	}
	sb.ipHeld = false
}

// run runs a command and returns its error with its output, for the `ip` calls.
func run(name string, args ...string) error {
	var out bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}

// setupNetwork creates the pod's network namespace, connects it to the bridge and writes the
// resolv.conf and hosts that every process of the pod sees.
func (p *Provider) setupNetwork(pod *corev1.Pod, sb *sandbox) error {
	if pod.Spec.HostNetwork {
		sb.ip = p.cfg.NodeIP
		sb.networkUp = true
		return nil
	}
	addr, err := p.ipam.allocate()
	if err != nil {
		return err
	}
	sb.ip, sb.ipHeld = addr.String(), true
	gateway, err := netip.ParsePrefix(p.cfg.Gateway)
	if err != nil {
		p.ipam.releaseHeld(sb)
		return fmt.Errorf("--gateway %q (want the bridge address as a CIDR): %w", p.cfg.Gateway, err)
	}
	uid := strings.ReplaceAll(string(pod.UID), "-", "")
	sb.netns = p.cfg.NetnsPrefix + uid
	sb.veth = "nrv" + uid[:12]
	steps := [][]string{
		{"netns", "add", sb.netns},
		{"link", "add", sb.veth, "type", "veth", "peer", "name", "eth0", "netns", sb.netns},
		{"link", "set", sb.veth, "master", p.cfg.Bridge, "up"},
		{"-n", sb.netns, "link", "set", "lo", "up"},
		{"-n", sb.netns, "addr", "add", fmt.Sprintf("%s/%d", sb.ip, gateway.Bits()), "dev", "eth0"},
		{"-n", sb.netns, "link", "set", "eth0", "up"},
		{"-n", sb.netns, "route", "add", "default", "via", gateway.Addr().String()},
	}
	for _, step := range steps {
		if err := run("ip", step...); err != nil {
			p.teardownNetwork(sb)
			return err
		}
	}
	etc := filepath.Join("/etc/netns", sb.netns)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		p.teardownNetwork(sb)
		return err
	}
	files := map[string]string{"resolv.conf": p.resolvConf(pod), "hosts": p.hostsFile(pod, sb)}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(content), 0o644); err != nil {
			p.teardownNetwork(sb)
			return err
		}
	}
	sb.networkUp = true
	return nil
}

// teardownNetwork ends every process left in the namespace, removes it (the veth goes with it) and
// gives the pod's address back. It runs again when a finished pod is deleted: a no-op by then.
func (p *Provider) teardownNetwork(sb *sandbox) {
	if sb.netns != "" {
		killNetnsProcesses(sb.netns)
		_ = run("ip", "netns", "del", sb.netns)
		_ = os.RemoveAll(filepath.Join("/etc/netns", sb.netns))
	}
	p.ipam.releaseHeld(sb)
	sb.networkUp = false
}

// killNetnsProcesses SIGKILLs whatever still runs in a network namespace (daemons a container
// started in sessions of their own, which its process group does not reach).
func killNetnsProcesses(netns string) {
	out, err := exec.Command("ip", "netns", "pids", netns).Output()
	if err != nil {
		return
	}
	for _, field := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(field); err == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// removeFiles unmounts the pod's tmpfs volumes and deletes its folder (logs included).
func (sb *sandbox) removeFiles() {
	for _, mnt := range sb.tmpfs {
		_ = syscall.Unmount(mnt, syscall.MNT_DETACH)
	}
	sb.tmpfs = nil
	_ = os.RemoveAll(sb.dir)
}

// resolvConf follows the kubelet's dnsPolicy rules
// (https://kubernetes.io/docs/concepts/services-networking/dns-pod-service/#pod-s-dns-policy).
func (p *Provider) resolvConf(pod *corev1.Pod) string {
	var servers, searches, options []string
	policy := pod.Spec.DNSPolicy
	if policy == "" {
		policy = corev1.DNSClusterFirst
	}
	clusterFirst := policy == corev1.DNSClusterFirst && !pod.Spec.HostNetwork ||
		policy == corev1.DNSClusterFirstWithHostNet
	switch {
	case clusterFirst && p.cfg.ClusterDNS != "":
		servers = []string{p.cfg.ClusterDNS}
		d := p.cfg.ClusterDomain
		searches = []string{pod.Namespace + ".svc." + d, "svc." + d, d}
		options = []string{"ndots:5"}
	case policy == corev1.DNSNone:
	default: // Default, or ClusterFirst without cluster DNS: the node's resolver
		host, _ := os.ReadFile("/etc/resolv.conf")
		for _, line := range strings.Split(string(host), "\n") {
			fields := strings.Fields(line)
			if len(fields) > 1 && fields[0] == "nameserver" {
				servers = append(servers, fields[1])
			} else if len(fields) > 1 && fields[0] == "search" {
				searches = append(searches, fields[1:]...)
			}
		}
	}
	if c := pod.Spec.DNSConfig; c != nil {
		servers = append(servers, c.Nameservers...)
		searches = append(searches, c.Searches...)
		for _, o := range c.Options {
			if o.Value != nil {
				options = append(options, o.Name+":"+*o.Value)
			} else {
				options = append(options, o.Name)
			}
		}
	}
	var b strings.Builder
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	if len(searches) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(searches, " "))
	}
	if len(options) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(options, " "))
	}
	return b.String()
}

// hostsFile is the kubelet-managed /etc/hosts: localhost, the pod's own name and hostAliases.
func (p *Provider) hostsFile(pod *corev1.Pod, sb *sandbox) string {
	var b strings.Builder
	b.WriteString("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	if pod.Spec.Subdomain != "" {
		fqdn := fmt.Sprintf("%s.%s.%s.svc.%s", sb.hostname, pod.Spec.Subdomain, pod.Namespace, p.cfg.ClusterDomain)
		fmt.Fprintf(&b, "%s\t%s\t%s\n", sb.ip, fqdn, sb.hostname)
	} else {
		fmt.Fprintf(&b, "%s\t%s\n", sb.ip, sb.hostname)
	}
	for _, alias := range pod.Spec.HostAliases {
		fmt.Fprintf(&b, "%s\t%s\n", alias.IP, strings.Join(alias.Hostnames, "\t"))
	}
	return b.String()
}

// podHostname is the pod's hostname: spec.hostname, else its name cut to 63 characters.
func podHostname(pod *corev1.Pod) string {
	name := pod.Spec.Hostname
	if name == "" {
		name = pod.Name
	}
	if len(name) > 63 {
		name = strings.TrimRight(name[:63], "-.")
	}
	return name
}
