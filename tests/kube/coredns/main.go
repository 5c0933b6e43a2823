// CoreDNS, the cluster DNS server of Kubernetes, built from its published Go module
// (github.com/coredns/coredns, pinned in go.mod) with only the plugins used by the upstream
// Kubernetes Corefile: errors, log, health, ready, kubernetes, prometheus, forward, cache, loop,
// reload and loadbalance. It follows the CoreDNS documentation for building with a chosen set of
// plugins from external Go source ("Build with external golang source code" in
// https://coredns.io/2017/07/25/compile-time-enabling-or-disabling-plugins/, and the package
// documentation of github.com/coredns/coredns/core/dnsserver): import the plugin packages, set
// the directive list in execution order, then run coremain exactly as CoreDNS's own coredns.go
// does. Leaving out the other plugins keeps the cloud-provider SDKs out of the build.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics" // the "prometheus" directive
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// directives lists the plugins in execution order, the order they have in CoreDNS's plugin.cfg
// (core/dnsserver/zdirectives.go); the order of lines in a Corefile does not matter.
var directives = []string{
	"reload",
	"ready",
	"health",
	"prometheus",
	"errors",
	"log",
	"loadbalance",
	"cache",
	"kubernetes",
	"loop",
	"forward",
}

func init() {
	if err := dnsserver.SetDirectives(directives); err != nil {
		panic(err)
	}
}

func main() {
	coremain.Run()
}
