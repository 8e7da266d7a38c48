//go:build tools

// Package tools pins wireguard-go, the userspace WireGuard the mesh tests'
// nodes run (this kernel has no WireGuard module, but has TUN); build.sh
// builds it.
package tools

import _ "golang.zx2c4.com/wireguard"
