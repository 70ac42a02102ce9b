// Command etcd is etcd's own server main, built from the published
// go.etcd.io/etcd/server/v3 module (the repository's root module, which holds
// the usual main package, cannot be built as a dependency).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
