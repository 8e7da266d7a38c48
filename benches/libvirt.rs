//! `make bench-libvirt`: real QEMU VMs (TCG) on the private libvirtd the
//! libvirt tests use, deployed by one operator process. For one VM, then
//! for three applied at once, prints per VM `apply_to_address_seconds`
//! (defined, booted and leased: the address is in status),
//! `apply_to_ready_seconds` (the system pushed and activated: Ready on the
//! closure), the guest's own `kernel_to_userspace_seconds` (its dmesg:
//! when the kernel ran the initramfs) and `qemu_rss_mib` per QEMU process.
//! A benchmark, not a test: figures go in notes, not assertions.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use futures::future::join_all;
use kube::api::DeleteParams;
use serde_json::json;
use support::fleet::{nonce, system};
use support::libvirt::{VM_TIMEOUT, create_machine_with, delete_all, exec, hypervisor, start_fleet};
use support::node::Activation;

/// Applies `count` Machines at once and prints their figures.
async fn round(fleet: &support::fleet::Fleet, count: usize) {
    let hv = hypervisor();
    let closure = system("bench", &nonce(), &[("motd", "benchmarked")], Activation::Ok);
    let names: Vec<String> = (0..count).map(|i| format!("vm{count}-{i}")).collect();
    let applied = Instant::now();
    for name in &names {
        create_machine_with(fleet, hv, name, Some(&closure), json!({})).await;
    }
    let timings = join_all(names.iter().map(|name| async {
        support::wait_for(&fleet.machines, name, VM_TIMEOUT, "an address in status", |m| {
            m.status.as_ref().is_some_and(|s| !s.addresses.is_empty())
        })
        .await;
        let address = applied.elapsed();
        let machine = fleet.wait_running_within(name, &closure, VM_TIMEOUT).await;
        (address, applied.elapsed(), machine)
    }))
    .await;
    let rss: Vec<u64> = hv.qemu_rss_kib().into_iter().map(|kib| kib / 1024).collect();
    for (name, (address, ready, machine)) in names.iter().zip(&timings) {
        let dmesg = exec(fleet, machine, "dmesg | grep -m1 'Run /init as init process'").await;
        let userspace = dmesg.split(']').next().and_then(|t| t.trim_start_matches('[').trim().parse::<f64>().ok());
        println!(
            "vms={count} machine={name} apply_to_address_seconds={:.1} apply_to_ready_seconds={:.1} \
             kernel_to_userspace_seconds={}",
            address.as_secs_f64(),
            ready.as_secs_f64(),
            userspace.map_or_else(|| format!("unknown ({dmesg:?})"), |s| format!("{s:.1}")),
        );
    }
    println!("vms={count} qemu_rss_mib={rss:?}");
    for name in &names {
        fleet.machines.delete(name, &DeleteParams::default()).await.expect("delete the machine");
    }
    for name in &names {
        support::wait_gone(&fleet.machines, name, VM_TIMEOUT).await;
    }
}

#[tokio::main]
async fn main() {
    let fleet = start_fleet("lv-bench", hypervisor(), 1).await;
    round(&fleet, 1).await;
    round(&fleet, 3).await;
    delete_all(&fleet, &[]).await;
}
