//go:build tools

// Package tools pins the etcd server the tests run; hack/controlplane/build.sh
// builds it from this module.
package tools

import _ "go.etcd.io/etcd/server/v3"
