//! KeyPair controller: generates an ed25519 key pair into the named Secret
//! (or takes an imported public key), and reports its fingerprint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Resource, ResourceExt};
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;

use super::status::Conditions;
use super::{Cleanup, Context, Error, Reconciler, Result, object_status};
use crate::api::keypair::KeyPairStatus;
use crate::api::network::ResourcePhase;
use crate::api::{DeletionPolicy, EXTERNAL_NAME_ANNOTATION, KeyPair, ManagementPolicy};
use crate::provider::{CloudKey, CloudTarget, Owner};
use crate::ssh::HostKey;

object_status!(KeyPairStatus, failed = ResourcePhase::Failed, deleting = ResourcePhase::Deleting);

/// Secret key holding the private key (the kubernetes.io/ssh-auth convention).
pub const PRIVATE_KEY: &str = "ssh-privatekey";
/// Secret key holding the public key.
pub const PUBLIC_KEY: &str = "ssh-publickey";
/// Annotation on Secrets the operator generated, naming the KeyPair's UID;
/// only those are deleted with their KeyPair.
pub const GENERATED_FOR_ANNOTATION: &str = "nixops.io/generated-for";

impl Reconciler for KeyPair {
    type Status = KeyPairStatus;
    const KIND: &'static str = "KeyPair";

    fn status(&self) -> Option<&KeyPairStatus> {
        self.status.as_ref()
    }

    async fn apply(self: Arc<Self>, ctx: Arc<Context>, status: &mut KeyPairStatus) -> Result<Option<Duration>> {
        let ns = self.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let secret_name = &self.spec.secret_ref.name;
        let secret = secrets.get_opt(secret_name).await?;
        let private = secret.as_ref().and_then(|s| s.data.as_ref()?.get(PRIVATE_KEY)).map(|b| b.0.clone());
        let issued = IssuedKey::of(status);

        let (public, message) = match (&self.spec.public_key, private) {
            // Imported: the spec's public key is authoritative; a private key, if present, must match it.
            (Some(imported), private) => {
                let public = HostKey::parse(imported, "spec.publicKey")
                    .map_err(|e| Error::stalled("InvalidPublicKey", e.to_string()))?;
                match private {
                    Some(bytes) => {
                        let derived = public_of(&bytes, secret_name)?;
                        if derived != public {
                            return Err(Error::stalled(
                                "KeyMismatch",
                                format!(
                                    "Secret {secret_name} key {PRIVATE_KEY} holds the private half of {}, not of spec.publicKey ({}); \
                                     fix spec.publicKey or the Secret",
                                    derived.fingerprint(),
                                    public.fingerprint()
                                ),
                            ));
                        }
                        (public, "imported public key; private key present in the Secret".to_owned())
                    }
                    None => (
                        public,
                        format!(
                            "imported public key; Secret {secret_name} has no {PRIVATE_KEY}, so the operator cannot log in with it"
                        ),
                    ),
                }
            }
            (None, Some(bytes)) => (public_of(&bytes, secret_name)?, format!("key pair in Secret {secret_name}")),
            // Never a new key for one that was lost: see IssuedKey.
            (None, None) if let Some(issued) = &issued => return Err(issued.lost(secret_name)),
            (None, None) if secret.is_some() => {
                return Err(Error::stalled(
                    "SecretWithoutKey",
                    format!(
                        "Secret {secret_name} exists but has no {PRIVATE_KEY} key; add the private key there, \
                         or delete the Secret to let the operator generate a key pair"
                    ),
                ));
            }
            (None, None) => {
                let public = generate_into(&secrets, &self).await?;
                ctx.event(
                    &*self,
                    EventType::Normal,
                    "KeyGenerated",
                    format!("generated an ed25519 key pair {} into Secret {secret_name}", public.fingerprint()),
                )
                .await;
                (public, format!("key pair in Secret {secret_name}"))
            }
        };

        if let Some(issued) = &issued {
            let source = match self.spec.public_key {
                Some(_) => "spec.publicKey".to_owned(),
                None => format!("Secret {secret_name}"),
            };
            issued.check(&public, &source)?;
        }

        status.cloud_key_name = None;
        if self.spec.provider.as_ref().is_some_and(|p| p.ec2.is_some()) {
            let target = self.target(&ctx).await?;
            let provider = ctx.providers.keypair("ec2")?;
            let name = self.ec2_key_name();
            if self.spec.management_policy == ManagementPolicy::Observe {
                if provider.find(&target, &name).await? == CloudKey::Absent {
                    return Err(Error::stalled(
                        "KeyPairNotFound",
                        format!(
                            "EC2 key pair {name} does not exist; managementPolicy Observe only reads an existing one"
                        ),
                    ));
                }
                status.cloud_key_name = Some(name.clone());
                status.public_key = Some(public.to_openssh());
                status.fingerprint = Some(public.fingerprint());
                status.phase = Some(ResourcePhase::Ready);
                Conditions::new(&mut status.conditions, self.metadata.generation).ready(
                    "Observing",
                    format!("observing EC2 key pair {name}; managementPolicy Observe never changes or deletes it"),
                );
                return Ok(None);
            }
            let api = Api::<KeyPair>::namespaced(ctx.client.clone(), &ns);
            let adopt = self.annotations().get(EXTERNAL_NAME_ANNOTATION) == Some(&name);
            match provider.find(&target, &name).await? {
                // The lookup found what a create (maybe interrupted) made.
                CloudKey::Ours => super::clear_create_pending(&api, &self).await?,
                CloudKey::Other if adopt => {}
                CloudKey::Other => {
                    return Err(Error::stalled(
                        "KeyNameTaken",
                        format!(
                            "an EC2 key pair named {name} exists and was not created for this KeyPair; set spec.provider.ec2.keyName to another name"
                        ),
                    ));
                }
                CloudKey::Absent => {
                    // The mark stays until a lookup finds the key: a read
                    // lagging the import must not import it again.
                    let part = format!("key pair {name}");
                    let public = public.to_openssh();
                    let import = || provider.import(&target, &name, &public);
                    super::create_part_once(&api, &*self, &ctx, "key-pair", &part, import).await?;
                    ctx.event(
                        &*self,
                        EventType::Normal,
                        "Registered",
                        format!("imported the public key into EC2 as key pair {name}"),
                    )
                    .await;
                }
            }
            status.cloud_key_name = Some(name);
        }
        status.public_key = Some(public.to_openssh());
        status.fingerprint = Some(public.fingerprint());
        status.phase = Some(ResourcePhase::Ready);
        Conditions::new(&mut status.conditions, self.metadata.generation).ready("Ready", message);
        Ok(None)
    }

    async fn cleanup(self: Arc<Self>, ctx: Arc<Context>) -> Result<Cleanup> {
        if self.spec.deletion_policy == DeletionPolicy::Orphan {
            return Ok(Cleanup::Done);
        }
        if self.spec.management_policy == ManagementPolicy::Observe {
            return Ok(Cleanup::Done);
        }
        if self.spec.provider.as_ref().is_some_and(|p| p.ec2.is_some()) {
            match self.target(&ctx).await {
                Ok(target) => ctx.providers.keypair("ec2")?.delete(&target, &self.ec2_key_name()).await?,
                // Without its Network the account is unknown: nothing to delete there.
                Err(Error::Waiting { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        let ns = self.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let uid = self.uid().unwrap_or_default();
        if let Some(secret) = secrets.get_opt(&self.spec.secret_ref.name).await?
            && secret.annotations().get(GENERATED_FOR_ANNOTATION) == Some(&uid)
        {
            match secrets.delete(&secret.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(Cleanup::Done)
    }
}

/// The key a KeyPair handed out (status.fingerprint), and where it is
/// registered. It is the KeyPair's identity: EC2 keeps the public key it
/// imported, instances launched with it authorise it, and so do machines
/// configured with status.publicKey; the operator cannot change any of that
/// (it cannot log in with a key they do not accept). So a lost private key
/// is not replaced by a new one, nor a key swapped in the Secret taken: the
/// KeyPair stalls, saying how to restore the key or replace it deliberately.
#[derive(Debug)]
struct IssuedKey {
    fingerprint: String,
    cloud_key_name: Option<String>,
}

impl IssuedKey {
    fn of(status: &KeyPairStatus) -> Option<Self> {
        Some(Self { fingerprint: status.fingerprint.clone()?, cloud_key_name: status.cloud_key_name.clone() })
    }

    /// Who accepts the key, for messages.
    fn authorised_by(&self) -> String {
        match &self.cloud_key_name {
            Some(name) => format!(
                "EC2 key pair {name}, instances launched with it and machines configured with its public key accept only {}",
                self.fingerprint
            ),
            None => format!("machines configured with its public key accept only {}", self.fingerprint),
        }
    }

    fn replace_deliberately() -> &'static str {
        "or, to replace the key, delete this KeyPair, create it again and authorise its new status.publicKey on the machines that use it"
    }

    /// The Secret lost the private key of the issued key.
    fn lost(&self, secret_name: &str) -> Error {
        Error::stalled(
            "PrivateKeyLost",
            format!(
                "Secret {secret_name} no longer holds {PRIVATE_KEY} for {}, the key this KeyPair issued; {}, so no new key is generated. \
                 Restore {PRIVATE_KEY} in Secret {secret_name} from a backup, {}",
                self.fingerprint,
                self.authorised_by(),
                Self::replace_deliberately()
            ),
        )
    }

    /// The key found now (in `source`) must be the issued one.
    fn check(&self, found: &HostKey, source: &str) -> Result<()> {
        if found.fingerprint() == self.fingerprint {
            return Ok(());
        }
        Err(Error::stalled(
            "KeyReplaced",
            format!(
                "{source} now holds key {}, but this KeyPair issued {}; {}. Restore the key {} in {source}, {}",
                found.fingerprint(),
                self.fingerprint,
                self.authorised_by(),
                self.fingerprint,
                Self::replace_deliberately()
            ),
        ))
    }
}

impl KeyPair {
    /// The name of the key pair in EC2: spec.provider.ec2.keyName, else `<namespace>-<name>`.
    pub fn ec2_key_name(&self) -> String {
        self.spec
            .provider
            .as_ref()
            .and_then(|p| p.ec2.as_ref())
            .and_then(|e| e.key_name.clone())
            .or_else(|| self.annotations().get(EXTERNAL_NAME_ANNOTATION).cloned())
            .unwrap_or_else(|| format!("{}-{}", self.namespace().unwrap_or_default(), self.name_any()))
    }

    fn owner(&self) -> Owner {
        Owner::of(self)
    }

    /// The key pair's identity and its Network (the account).
    async fn target(&self, ctx: &Context) -> Result<CloudTarget> {
        let ns = self.namespace().unwrap_or_default();
        let name = self.spec.network_ref.as_ref().map(|r| r.name.clone()).unwrap_or_default();
        let network = super::resolve_network(ctx, &ns, &name, "spec.networkRef.name").await?;
        Ok(CloudTarget { owner: self.owner(), network })
    }
}

/// The KeyPair controller. A change to a KeyPair's Secret wakes it, so a
/// deleted or replaced key is reported at once, not at the next resync.
pub fn controller(
    keypairs: &mut super::shared::SharedWatch<KeyPair>,
    secrets: Api<Secret>,
    networks: &mut super::shared::SharedWatch<crate::api::Network>,
    wc: watcher::Config,
) -> Controller<KeyPair> {
    let controller = Controller::for_stream(keypairs.applied(), keypairs.store());
    let by_secret = keypairs.store();
    let by_network = keypairs.store();
    fn network_of(k: &KeyPair) -> Option<&str> {
        k.spec.network_ref.as_ref().map(|r| r.name.as_str())
    }
    controller.watches_stream(networks.touched(), super::network_dependents(by_network, network_of)).watches(
        secrets,
        wc,
        move |secret| {
            let ns = secret.namespace();
            let name = secret.name_any();
            by_secret
                .state()
                .into_iter()
                .filter(|k| k.namespace() == ns && k.spec.secret_ref.name == name)
                .map(|k| ObjectRef::from_obj(&*k))
                .collect::<Vec<_>>()
        },
    )
}

/// The private key a Machine logs in with: the KeyPair's Secret's
/// ssh-privatekey. A KeyPair without it cannot be used to deploy.
pub async fn private_key(ctx: &Context, ns: &str, keypair: &KeyPair) -> Result<PrivateKey> {
    private_key_with(&ctx.client, ns, keypair).await
}

/// [`private_key`] with any client (kubectl nixops uses the user's).
pub async fn private_key_with(client: &kube::Client, ns: &str, keypair: &KeyPair) -> Result<PrivateKey> {
    let secret_name = &keypair.spec.secret_ref.name;
    let secret = Api::<Secret>::namespaced(client.clone(), ns).get_opt(secret_name).await?;
    let private = secret.as_ref().and_then(|s| s.data.as_ref()?.get(PRIVATE_KEY)).ok_or_else(|| {
        Error::stalled(
            "NoPrivateKey",
            format!(
                "KeyPair {} has no private key (Secret {secret_name} key {PRIVATE_KEY}), so the operator cannot log in to deploy; add it",
                keypair.name_any()
            ),
        )
    })?;
    let text = std::str::from_utf8(&private.0).map_err(|_| bad_private_key(secret_name, "not UTF-8 text"))?;
    PrivateKey::from_openssh(text).map_err(|e| bad_private_key(secret_name, &e.to_string()))
}

/// The public half of an OpenSSH private key held in a Secret.
fn public_of(private: &[u8], secret_name: &str) -> Result<HostKey> {
    let text = std::str::from_utf8(private).map_err(|_| bad_private_key(secret_name, "not UTF-8 text"))?;
    let key = PrivateKey::from_openssh(text).map_err(|e| bad_private_key(secret_name, &e.to_string()))?;
    let public = key.public_key().to_openssh().map_err(|e| bad_private_key(secret_name, &e.to_string()))?;
    HostKey::parse(&public, "derived public key").map_err(|e| bad_private_key(secret_name, &e.to_string()))
}

fn bad_private_key(secret_name: &str, why: &str) -> Error {
    Error::stalled(
        "InvalidPrivateKey",
        format!("Secret {secret_name} key {PRIVATE_KEY} is not an unencrypted OpenSSH private key ({why}); replace it"),
    )
}

/// Generates an ed25519 key pair and creates the Secret holding it.
async fn generate_into(secrets: &Api<Secret>, keypair: &KeyPair) -> Result<HostKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Error::stalled("NoRandomness", format!("cannot read random bytes: {e}")))?;
    let mut private = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    seed.fill(0);
    private.set_comment(format!("nixops-operator {}/{}", keypair.namespace().unwrap_or_default(), keypair.name_any()));
    let private_text = private
        .to_openssh(LineEnding::LF)
        .map_err(|e| Error::stalled("KeyEncoding", format!("cannot encode the generated key: {e}")))?;
    let public_text = private
        .public_key()
        .to_openssh()
        .map_err(|e| Error::stalled("KeyEncoding", format!("cannot encode the generated key: {e}")))?;

    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(keypair.spec.secret_ref.name.clone()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".into(), "nixops-operator".into())])),
            annotations: Some(BTreeMap::from([(
                GENERATED_FOR_ANNOTATION.into(),
                keypair.meta().uid.clone().unwrap_or_default(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/ssh-auth".into()),
        data: Some(BTreeMap::from([
            (PRIVATE_KEY.into(), ByteString(private_text.as_bytes().to_vec())),
            (PUBLIC_KEY.into(), ByteString(public_text.clone().into_bytes())),
        ])),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {}
        // Created concurrently (or by a run that crashed before writing status): use what is there.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = secrets.get(&keypair.spec.secret_ref.name).await?;
            let bytes =
                existing.data.as_ref().and_then(|d| d.get(PRIVATE_KEY)).map(|b| b.0.clone()).unwrap_or_default();
            return public_of(&bytes, &keypair.spec.secret_ref.name);
        }
        Err(err) => return Err(err.into()),
    }
    HostKey::parse(&public_text, "generated public key").map_err(|e| Error::stalled("KeyEncoding", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsf5n2k2cOqRk8yE1xXKmbvmN4QUeTSR3dOzU6pD6VJ";
    const B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    fn stalled(err: Error) -> (&'static str, String) {
        let Error::Stalled { reason, message } = err else { panic!("must stall: {err}") };
        (reason, message)
    }

    #[test]
    fn a_key_never_issued_is_generated_and_an_issued_one_is_kept() {
        assert!(IssuedKey::of(&KeyPairStatus::default()).is_none(), "nothing issued: the operator may generate");
        let a = HostKey::parse(A, "a").unwrap();
        let issued = IssuedKey::of(&KeyPairStatus {
            fingerprint: Some(a.fingerprint()),
            cloud_key_name: Some("team-a-deployer".into()),
            ..KeyPairStatus::default()
        })
        .unwrap();
        assert!(issued.check(&a, "Secret deployer").is_ok());

        let (reason, message) = stalled(issued.lost("deployer"));
        assert_eq!(reason, "PrivateKeyLost");
        for says in [
            &a.fingerprint(),
            "EC2 key pair team-a-deployer",
            "Restore ssh-privatekey in Secret deployer",
            "delete this KeyPair",
        ] {
            assert!(message.contains(says), "{says}: {message}");
        }

        let b = HostKey::parse(B, "b").unwrap();
        let (reason, message) = stalled(issued.check(&b, "Secret deployer").unwrap_err());
        assert_eq!(reason, "KeyReplaced");
        assert!(message.contains(&format!("Secret deployer now holds key {}", b.fingerprint())), "{message}");
        assert!(message.contains(&format!("issued {}", a.fingerprint())), "{message}");
    }
}
