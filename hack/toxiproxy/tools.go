//go:build tools

// Package tools pins toxiproxy, the fault-injecting TCP proxy the tests put
// between the operator and its endpoints; build.sh builds its server.
package tools

import _ "github.com/Shopify/toxiproxy/v2/cmd/server"
