//go:build tools

// Package tools pins the Kubernetes commands the tests run. Nothing here is
// compiled into the operator; hack/controlplane/build.sh builds the listed
// commands from this module.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
