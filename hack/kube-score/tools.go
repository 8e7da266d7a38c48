//go:build tools

// Package tools pins kube-score, the static checker the chart tests run on
// the rendered chart to catch what third-party reviews of a chart flag;
// build.sh builds it.
package tools

import _ "github.com/zegl/kube-score/cmd/kube-score"
