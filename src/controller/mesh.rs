//! A Network's membership and encrypted mesh, in two halves.
//!
//! The Network's half ([`converge_keys`]): with `spec.mesh.wireguard`, each
//! member has a WireGuard key pair in the Secret `<machine>-wireguard`
//! (labelled with the Network and the member, owned by the Machine), which
//! also records the member's mesh address. The Secret is the record: a
//! member keeps its address while it exists, the status only mirrors it
//! (and lends the address back when the Secret is deleted to rotate the
//! key). Members that left lose their Secret.
//!
//! The Machine's half ([`publish`]): on every look at a member (before any
//! activation, and whenever the Network's membership changes, which wakes
//! every member), the membership document, the hosts block and the
//! interface are compared with what the machine has and rewritten where
//! they differ (see [`crate::nix::membership`]); each peer's last handshake
//! gives the Machine's `MeshReady` condition, the Network's is all of them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::deploy::ssh_error;
use super::status::Conditions;
use super::{Context, Error, Result};
use crate::api::Condition;
use crate::api::network::{NetworkMember, WireguardMesh};
use crate::api::{Machine, Network};
use crate::nix::membership::{self, Interface, Ipv4Range, Member, Membership, Mesh, Payload};
use crate::provider::ProviderError;
use crate::ssh::Session;

/// Label on a mesh key Secret: the Network's name.
pub const NETWORK_LABEL: &str = "nixops.io/mesh-network";
/// Label on a mesh key Secret: the member Machine's name.
pub const MEMBER_LABEL: &str = "nixops.io/mesh-member";
/// Annotation on a mesh key Secret: the member's mesh address.
pub const ADDRESS_ANNOTATION: &str = "nixops.io/mesh-address";
/// Secret key: the WireGuard private key (base64, as `wg genkey` prints it).
pub const PRIVATE_KEY: &str = "privateKey";
/// Secret key: the WireGuard public key.
pub const PUBLIC_KEY: &str = "publicKey";

/// Condition on Machines and Networks: every peer handshook recently.
pub const MESH_READY: &str = "MeshReady";
/// Condition on Machines: the membership document and hosts are current.
pub const MEMBERSHIP: &str = "Membership";

/// What the NixOS module is called in messages.
pub const MODULE_HINT: &str = "import nix/nixops-network.nix from the operator's repository into the machine's configuration \
     (it adds wireguard-tools, opens the mesh port and manages /etc/hosts)";

/// How soon a member whose peers have not all handshaken looks again.
const MESH_RECHECK: Duration = Duration::from_secs(5);

/// The Secret holding `machine`'s mesh key.
pub fn secret_name(machine: &str) -> String {
    format!("{machine}-wireguard")
}

/// A WireGuard key pair from 32 random bytes: (private, public), base64.
pub fn key_pair(mut seed: [u8; 32]) -> (String, String) {
    // Clamped as `wg genkey` does, so the Secret holds exactly what wg uses.
    seed[0] &= 248;
    seed[31] &= 127;
    seed[31] |= 64;
    let public = curve25519_dalek::MontgomeryPoint::mul_base_clamped(seed).to_bytes();
    let b64 = base64::engine::general_purpose::STANDARD;
    (b64.encode(seed), b64.encode(public))
}

/// The public key of a base64 private key, if it is one.
pub fn public_key_of(private: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(private.trim()).ok()?;
    let seed: [u8; 32] = bytes.try_into().ok()?;
    let public = curve25519_dalek::MontgomeryPoint::mul_base_clamped(seed).to_bytes();
    Some(base64::engine::general_purpose::STANDARD.encode(public))
}

/// The lowest address of `range` nobody has.
pub fn allocate(range: &Ipv4Range, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    range.hosts().find(|a| !taken.contains(a))
}

/// The mesh's settings from the spec.
pub fn mesh_of(network: &Network) -> Option<Mesh> {
    let wg: &WireguardMesh = network.spec.mesh.as_ref()?.wireguard.as_ref()?;
    Some(Mesh {
        range: Ipv4Range::parse(&wg.address_range)?,
        listen_port: u16::try_from(wg.listen_port).ok()?,
        persistent_keepalive: wg.persistent_keepalive.and_then(|k| u16::try_from(k).ok()),
        private_range: network
            .spec
            .provider
            .as_ref()
            .and_then(|p| p.ec2.as_ref())
            .and_then(|e| Ipv4Range::parse(&e.vpc.cidr_block)),
    })
}

/// A member's mesh facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshMember {
    pub address: Ipv4Addr,
    pub public_key: String,
}

/// A mesh key Secret found: whose it is, and what it holds.
struct KeySecret {
    name: String,
    member: String,
    address: Option<Ipv4Addr>,
    /// Derived from the private key (a Secret whose public key does not
    /// match is rotated, not trusted).
    public_key: Option<String>,
}

fn read_key_secret(secret: &Secret) -> Option<KeySecret> {
    let member = secret.labels().get(MEMBER_LABEL)?.clone();
    let data = secret.data.clone().unwrap_or_default();
    let private = data.get(PRIVATE_KEY).map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let public = private.as_deref().and_then(public_key_of);
    let stored_public = data.get(PUBLIC_KEY).map(|b| String::from_utf8_lossy(&b.0).trim().to_owned());
    Some(KeySecret {
        name: secret.name_any(),
        member,
        address: secret.annotations().get(ADDRESS_ANNOTATION).and_then(|a| a.parse().ok()),
        public_key: public.filter(|p| Some(p) == stored_public.as_ref()),
    })
}

/// Brings the mesh key Secrets of `network` to its members: one per member
/// with a key and an address, none for anyone else; without a mesh, none.
/// `recorded` is the status' member list (addresses to keep across a key
/// rotation). Returns each member's mesh facts.
pub async fn converge_keys(
    network: &Network,
    ctx: &Context,
    members: &[Arc<Machine>],
    recorded: &[NetworkMember],
) -> Result<BTreeMap<String, MeshMember>> {
    let ns = network.namespace().unwrap_or_default();
    let name = network.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(mesh) = mesh_of(network) else {
        // Only a Network that had a mesh has Secrets to remove: no list otherwise.
        if recorded.iter().any(|m| m.mesh_key.is_some()) {
            let found = secrets.list(&ListParams::default().labels(&format!("{NETWORK_LABEL}={name}"))).await?;
            for secret in found.items {
                delete_secret(&secrets, &secret.name_any()).await?;
            }
        }
        return Ok(BTreeMap::new());
    };
    let found = secrets.list(&ListParams::default().labels(&format!("{NETWORK_LABEL}={name}"))).await?;
    let names: BTreeSet<String> = members.iter().map(|m| m.name_any()).collect();
    let mut kept: BTreeMap<String, MeshMember> = BTreeMap::new();
    let mut taken: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut stale = Vec::new();
    for secret in found.items.iter().filter_map(read_key_secret) {
        let usable = names.contains(&secret.member)
            && secret.name == secret_name(&secret.member)
            && !kept.contains_key(&secret.member);
        match (usable, secret.address.filter(|a| mesh.range.contains(*a) && !taken.contains(a)), &secret.public_key) {
            (true, Some(address), Some(public_key)) => {
                taken.insert(address);
                kept.insert(secret.member.clone(), MeshMember { address, public_key: public_key.clone() });
            }
            _ => stale.push(secret),
        }
    }
    for secret in stale {
        delete_secret(&secrets, &secret.name).await?;
        if !names.contains(&secret.member) {
            ctx.event(
                network,
                EventType::Normal,
                "MeshPeerRemoved",
                format!("{} left the mesh; its key Secret {} is deleted", secret.member, secret.name),
            )
            .await;
        }
    }
    // Addresses recorded for current members are theirs even while their
    // Secret is being replaced.
    let recorded: BTreeMap<&str, &NetworkMember> = recorded.iter().map(|m| (m.name.as_str(), m)).collect();
    for member in members.iter().filter(|m| !kept.contains_key(&m.name_any())) {
        let address = recorded.get(member.name_any().as_str()).and_then(|r| r.mesh_address.as_deref());
        if let Some(Ok(address)) = address.map(str::parse::<Ipv4Addr>) {
            taken.insert(address);
        }
    }
    for member in members.iter().filter(|m| m.metadata.deletion_timestamp.is_none()) {
        let machine = member.name_any();
        if kept.contains_key(&machine) {
            continue;
        }
        let before = recorded.get(machine.as_str()).copied();
        let address = before
            .and_then(|r| r.mesh_address.as_deref()?.parse::<Ipv4Addr>().ok())
            .filter(|a| mesh.range.contains(*a) && !kept.values().any(|k| k.address == *a))
            .or_else(|| allocate(&mesh.range, &taken))
            .ok_or_else(|| {
                Error::stalled(
                    "MeshRangeExhausted",
                    format!(
                        "spec.mesh.wireguard.addressRange {}/{} has no free address left for {machine}; \
                         use a larger range in a new Network",
                        mesh.range.network, mesh.range.prefix
                    ),
                )
            })?;
        taken.insert(address);
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| Error::stalled("NoRandomness", format!("cannot read random bytes: {e}")))?;
        let (private, public) = key_pair(seed);
        seed.fill(0);
        create_key_secret(&secrets, network, member, address, &private, &public).await?;
        crate::fault::point(crate::fault::points::MESH_AFTER_KEY_CREATED, None).await;
        let (reason, what) = match before.and_then(|b| b.mesh_key.as_ref()) {
            Some(_) => ("MeshKeyRotated", "has a new key"),
            None => ("MeshPeerAdded", "joined the mesh"),
        };
        ctx.event(
            network,
            EventType::Normal,
            reason,
            format!("{machine} {what}: mesh address {address}, public key {public}"),
        )
        .await;
        kept.insert(machine, MeshMember { address, public_key: public });
    }
    Ok(kept)
}

async fn create_key_secret(
    secrets: &Api<Secret>,
    network: &Network,
    member: &Machine,
    address: Ipv4Addr,
    private: &str,
    public: &str,
) -> Result<()> {
    let machine = member.name_any();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&machine)),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".into(), "nixops-operator".into()),
                (NETWORK_LABEL.into(), network.name_any()),
                (MEMBER_LABEL.into(), machine.clone()),
            ])),
            annotations: Some(BTreeMap::from([(ADDRESS_ANNOTATION.into(), address.to_string())])),
            // Goes with the Machine.
            owner_references: Some(vec![OwnerReference {
                api_version: Machine::api_version(&()).into_owned(),
                kind: Machine::kind(&()).into_owned(),
                name: machine.clone(),
                uid: member.uid().unwrap_or_default(),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (PRIVATE_KEY.into(), ByteString(private.as_bytes().to_vec())),
            (PUBLIC_KEY.into(), ByteString(public.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Err(Error::stalled(
            "MeshSecretTaken",
            format!(
                "Secret {} exists but is not {machine}'s mesh key (labels {NETWORK_LABEL}, {MEMBER_LABEL}); \
                 rename or delete it so the operator can keep {machine}'s WireGuard key there",
                secret_name(&machine)
            ),
        )),
        Err(e) => Err(e.into()),
    }
}

async fn delete_secret(secrets: &Api<Secret>, name: &str) -> Result<()> {
    match secrets.delete(name, &DeleteParams::default()).await {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other.map(drop).map_err(Into::into),
    }
}

/// The membership `this` gets, from the Network's status.
pub fn membership_of(network: &Network, this: &str) -> Membership {
    let members = network.status.as_ref().map(|s| s.members.as_slice()).unwrap_or_default();
    Membership {
        network: super::object_key(network),
        this: this.to_owned(),
        members: members
            .iter()
            .map(|m| Member {
                name: m.name.clone(),
                addresses: m.addresses.iter().map(|a| (a.address_type.clone(), a.address.clone())).collect(),
                host_key: m.host_key.clone(),
                mesh_address: m.mesh_address.as_deref().and_then(|a| a.parse().ok()),
                mesh_public_key: m.mesh_key.clone(),
            })
            .collect(),
        mesh: mesh_of(network),
    }
}

/// Brings the machine's membership document, hosts block and mesh
/// interface to what `network` (with its status' members) says, and sets
/// the Machine's `Membership` and `MeshReady` conditions. Returns how soon
/// to look again while peers have not handshaken.
pub async fn publish(
    session: &Session,
    machine: &Machine,
    ctx: &Context,
    conditions: &mut Vec<Condition>,
) -> Result<Option<Duration>> {
    let this = machine.name_any();
    let generation = machine.metadata.generation;
    let ns = machine.namespace().unwrap_or_default();
    // The Network as the store has it, members included.
    let Some(network) = ctx.stores.membership(&ns, &machine.spec.network_ref.name).await? else { return Ok(None) };
    let membership = membership_of(&network, &this);
    let out = session.exec(&membership::inspect_script()).await.map_err(ssh_error)?;
    let found = membership::parse_inspection(&String::from_utf8_lossy(&out.stdout));
    let document = membership.document();
    let hosts = membership.hosts_block();

    let wireguard_missing = match found.wireguard.as_str() {
        "yes" => None,
        "notools" => Some("the machine has no `wg` (wireguard-tools)"),
        _ => Some("the machine has no WireGuard (kernel module or wireguard-go)"),
    };
    let interface = match (&membership.mesh, wireguard_missing) {
        (None, _) => {
            if found.wireguard_config == "missing" {
                Interface::Keep
            } else {
                Interface::Remove
            }
        }
        (Some(_), Some(_)) => Interface::Keep,
        (Some(_), None) => match (membership.interface_address(), own_private_key(ctx, machine, &membership).await?) {
            (Some(address), Some(private)) => match membership.wireguard_config(&private) {
                Some(config) => Interface::Configure { config, address },
                None => Interface::Keep,
            },
            _ => Interface::Keep,
        },
    };
    let interface_current = match &interface {
        Interface::Configure { config, address } => {
            found.wireguard_config == membership::sha256(config) && found.interface.as_deref() == Some(address)
        }
        Interface::Remove => false,
        Interface::Keep => true,
    };
    let mut unmanaged = found.hosts_file == "unmanaged";
    let mut applied = false;
    if found.document != membership::sha256(&document)
        || found.hosts != membership::sha256(&hosts)
        || !interface_current
    {
        let payload = Payload { document, hosts, interface };
        let out =
            session.exec_with_input(&membership::apply_script(&payload), &payload.input()).await.map_err(ssh_error)?;
        match out.status {
            Some(0) => {}
            Some(membership::EXIT_HOSTS_UNMANAGED) => unmanaged = true,
            Some(membership::EXIT_NO_WIREGUARD) => {
                return Err(Error::stalled(
                    "WireguardMissing",
                    format!(
                        "spec.mesh.wireguard of Network {}: the machine cannot create a WireGuard interface; {MODULE_HINT}",
                        network.name_any()
                    ),
                ));
            }
            _ => {
                return Err(ProviderError::Transient(format!(
                    "writing the Network's membership to the machine failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
                .into());
            }
        }
        applied = true;
    }
    let mut conds = Conditions::new(conditions, generation);
    let count = membership.members.len();
    if unmanaged {
        conds.set(
            MEMBERSHIP,
            false,
            "HostsUnmanaged",
            format!(
                "{} lists the {count} members of Network {}, but their names do not resolve: /etc/hosts is a symlink \
                 the operator does not manage; {MODULE_HINT}",
                membership::DOCUMENT,
                network.name_any()
            ),
        );
    } else {
        conds.set(
            MEMBERSHIP,
            true,
            "Published",
            format!(
                "{} and the hosts file list the {count} members of Network {}",
                membership::DOCUMENT,
                network.name_any()
            ),
        );
    }
    if membership.mesh.is_none() {
        conds.remove(MESH_READY);
        return Ok(None);
    }
    if let Some(missing) = wireguard_missing {
        conds.set(
            MESH_READY,
            false,
            "WireguardMissing",
            format!("{missing}, which spec.mesh.wireguard of Network {} needs; {MODULE_HINT}", network.name_any()),
        );
        return Ok(None);
    }
    let peers = membership.peers();
    let stale =
        if applied && !peers.is_empty() { peers.iter().map(|(n, _)| *n).collect() } else { found.stale_peers(&peers) };
    if stale.is_empty() {
        conds.set(
            MESH_READY,
            true,
            "Handshaken",
            format!("all {} peers handshook within the last 3 minutes", peers.len()),
        );
        Ok(None)
    } else {
        conds.set(
            MESH_READY,
            false,
            "WaitingForHandshake",
            format!("{} of {} peers without a recent handshake: {}", stale.len(), peers.len(), stale.join(", ")),
        );
        Ok(Some(MESH_RECHECK))
    }
}

/// This member's private key from its Secret, when the Secret holds the
/// key whose public half the Network publishes (after a rotation, the
/// Network's status may lag the Secret; the next membership change wakes
/// the member again).
async fn own_private_key(ctx: &Context, machine: &Machine, membership: &Membership) -> Result<Option<String>> {
    let this = membership.members.iter().find(|m| m.name == membership.this);
    let Some(published) = this.and_then(|m| m.mesh_public_key.as_deref()) else { return Ok(None) };
    let ns = machine.namespace().unwrap_or_default();
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &ns).get_opt(&secret_name(&membership.this)).await?;
    let private = secret
        .and_then(|s| s.data?.remove(PRIVATE_KEY))
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
        .filter(|p| public_key_of(p).as_deref() == Some(published));
    Ok(private)
}

/// Copies the conditions [`publish`] sets from `from` to `to`.
pub fn carry_conditions(from: &[Condition], to: &mut Vec<Condition>) {
    for type_ in [MEMBERSHIP, MESH_READY] {
        to.retain(|c| c.type_ != type_);
        to.extend(from.iter().filter(|c| c.type_ == type_).cloned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pairs_match_wireguard() {
        // From `wg genkey | tee priv | wg pubkey` (wireguard-tools).
        let private = "uDzp3+KOygnT+55YvuRe033tRMP2rDzM8Utu2ot8Y00=";
        assert_eq!(public_key_of(private).as_deref(), Some("5g+Yv399WLj1nWTcPXoRgFeAKaEYgWna5llli6pFMyQ="));
        let (private, public) = key_pair([7; 32]);
        assert_eq!(public_key_of(&private), Some(public));
        assert!(public_key_of("not a key").is_none());
    }

    #[test]
    fn addresses_are_the_lowest_free_ones() {
        let range = Ipv4Range::parse("10.77.0.0/30").unwrap();
        let mut taken = BTreeSet::new();
        assert_eq!(allocate(&range, &taken), Some(Ipv4Addr::new(10, 77, 0, 1)));
        taken.insert(Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(allocate(&range, &taken), Some(Ipv4Addr::new(10, 77, 0, 2)));
        taken.insert(Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(allocate(&range, &taken), None, "a /30 has two host addresses");
    }
}
