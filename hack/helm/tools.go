//go:build tools

// Package tools pins helm, which the chart tests use to lint, render,
// install and upgrade charts/nixops-operator against the real API server;
// build.sh builds it.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
