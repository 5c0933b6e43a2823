// etcd server, the same entry point as the upstream etcd binary, at the version kube-apiserver
// is built and tested against.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
