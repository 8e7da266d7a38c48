# nixops-operator — see README.md.
.PHONY: quickstart quickstart-down quickstart-redeploy quickstart-build test deps controlplane crds lint dev-cluster dev-cluster-down bench-scale bench-push bench-libvirt image plugin

# Sets up everything the tests need (Debian packages, the Go-built control
# plane) and runs every test, including those against the real API server.
# fault-injection compiles in the named fault points (src/fault.rs) that
# tests/deploy_faults.rs uses to kill the operator at exact steps.
test: deps
	cargo test --locked --features fault-injection --lib --bins --tests

deps:
	hack/install-deps.sh

controlplane:
	hack/controlplane/build.sh

# Regenerates crds/ from src/api (a test fails when it is stale).
crds:
	cargo run --quiet --locked -- crds --out-dir crds
	cp crds/*.yaml charts/nixops-operator/crds/

# Clippy runs twice: with every feature, and without the libvirt feature
# (the build `make plugin` makes, which needs no libvirt-dev).
lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --all-features --locked -- -D warnings
	cargo clippy --lib --bins --no-default-features --locked -- -D warnings

dev-cluster: deps
	@hack/dev-cluster.sh up

# A local control plane, a NixOS-like node and the operator, with
# examples/quickstart/ deployed; run it again to reuse what is running.
# PROVIDER=libvirt: the machine is a QEMU VM on a private libvirtd instead.
PROVIDER ?= node
quickstart: deps
	@QUICKSTART_PROVIDER=$(PROVIDER) hack/quickstart/quickstart.sh up

# Builds the demo system with another message and deploys it.
MESSAGE ?= hello again
quickstart-redeploy:
	@hack/quickstart/quickstart.sh redeploy "$(MESSAGE)"

quickstart-build:
	@hack/quickstart/quickstart.sh build "$(MESSAGE)"

quickstart-down:
	@hack/quickstart/quickstart.sh down

dev-cluster-down:
	@hack/dev-cluster.sh down

# SCALE_OBJECTS objects (default 2,000) reconciled by one operator; prints
# scale_ready_seconds, resync_writes, rss_mib,
# network_reconciles_per_member_change and machine_list_calls. For #11's
# 10,000: SCALE_OBJECTS=10000 SCALE_RESYNC_SECONDS=300 (a 60 s resync of
# 5,000 Machines over SSH leaves a 2-core machine no time for anything else).
bench-scale: deps
	cargo bench --locked --bench scale

# Our push against nix-copy-closure (loopback, a 50 ms / 100 Mbit/s link,
# incremental, fan-out to 10 nodes); prints push_ratio_* figures.
bench-push: deps
	cargo bench --locked --bench push

# Real QEMU VMs on the tests' private libvirtd: apply -> address and apply ->
# Ready for one VM and for three at once, the guest's boot time, QEMU RSS.
bench-libvirt: deps
	cargo bench --locked --bench libvirt

# The operator image without a registry (hack/image/build.sh: umoci, from
# the release binary); writes target/image/ (README: loading into kind/k3d).
image:
	hack/image/build.sh

# kubectl nixops, installed into ~/.cargo/bin; it needs no libvirt, so it is
# built without the libvirt feature (and without libvirt-dev).
plugin:
	cargo install --locked --path . --bin kubectl-nixops --no-default-features
