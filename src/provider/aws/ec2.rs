//! EC2 instances for Machines. An instance is found by the Machine's UID tag
//! (set in the RunInstances call itself), never by a client token: after a
//! crash the lookup by tag runs before any second RunInstances.

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification,
    VolumeType,
};

use super::{AwsAccounts, tags};
use crate::api::machine::{Ec2Instance, MachineAddress};
use crate::provider::{Instance, InstanceState, MachineProvider, MachineTarget, ProviderError};

/// Port sshd listens on in a NixOS AMI; spec.ssh.port overrides it.
const SSH_PORT: u16 = 22;

/// Provider for `spec.provider.ec2`.
pub struct Ec2Machines {
    pub accounts: AwsAccounts,
}

impl Ec2Machines {
    pub fn new(accounts: AwsAccounts) -> Arc<Self> {
        Arc::new(Self { accounts })
    }

    fn spec(target: &MachineTarget) -> Result<&Ec2Instance, ProviderError> {
        target
            .provider
            .ec2
            .as_ref()
            .ok_or_else(|| ProviderError::permanent("NoProvider", "spec.provider.ec2 is not set"))
    }

    async fn clients(&self, target: &MachineTarget) -> Result<Arc<super::AwsClients>, ProviderError> {
        let network =
            target.network.as_ref().ok_or_else(|| ProviderError::Refused("the Network is not resolved yet".into()))?;
        self.accounts.for_network(network).await
    }
}

fn state(name: Option<&InstanceStateName>) -> InstanceState {
    match name {
        Some(InstanceStateName::Pending) => InstanceState::Pending,
        Some(InstanceStateName::Stopping) | Some(InstanceStateName::ShuttingDown) => InstanceState::Stopping,
        Some(InstanceStateName::Stopped) => InstanceState::Stopped,
        _ => InstanceState::Running,
    }
}

fn instance(i: &aws_sdk_ec2::types::Instance, ssh_port: u16) -> Instance {
    let id = i.instance_id().unwrap_or_default();
    let zone = i.placement().and_then(|p| p.availability_zone()).unwrap_or_default();
    let mut addresses = Vec::new();
    if let Some(ip) = i.public_ip_address() {
        addresses.push(MachineAddress { address_type: "ExternalIP".into(), address: ip.to_owned() });
    }
    if let Some(ip) = i.private_ip_address() {
        addresses.push(MachineAddress { address_type: "InternalIP".into(), address: ip.to_owned() });
    }
    Instance {
        provider_id: Some(format!("aws:///{zone}/{id}")),
        ssh_host: addresses.first().map(|a| a.address.clone()).unwrap_or_default(),
        ssh_port,
        addresses,
        state: state(i.state().and_then(|s| s.name())),
        host_key: None,
        restart_pending: None,
    }
}

/// Where a new instance goes: the subnet the spec names and the Network's
/// security group, once the Network's VPC is provisioned.
fn launch_place(target: &MachineTarget) -> Result<(String, Option<String>), ProviderError> {
    let spec = Ec2Machines::spec(target)?;
    let network = target.network.as_ref().and_then(|n| n.status.as_ref());
    let network_ready =
        network.is_some_and(|s| crate::controller::status::is_true(&s.conditions, crate::api::condition::READY));
    if !network_ready {
        return Err(ProviderError::Refused("waiting for the Network's VPC to be provisioned".into()));
    }
    let subnet_id = network
        .and_then(|s| s.subnets.iter().find(|sub| sub.name == spec.subnet))
        .map(|sub| sub.id.clone())
        .ok_or_else(|| {
            ProviderError::permanent(
                "SubnetNotFound",
                format!("spec.provider.ec2.subnet {} is not (yet) a subnet of the Network; name one of its spec.provider.ec2.subnets", spec.subnet),
            )
        })?;
    Ok((subnet_id, network.and_then(|s| s.security_group_id.clone())))
}

/// Instances tagged with the owner's UID that are not terminated.
async fn find(
    aws: &super::AwsClients,
    target: &MachineTarget,
) -> Result<Vec<aws_sdk_ec2::types::Instance>, ProviderError> {
    let live = Filter::builder()
        .name("instance-state-name")
        .values("pending")
        .values("running")
        .values("stopping")
        .values("stopped")
        .build();
    let request = match &target.external_id {
        Some(id) => aws.reading().await.ec2.describe_instances().instance_ids(id).filters(live),
        None if crate::fault::lookup_lags() => return Ok(Vec::new()),
        None => aws
            .reading()
            .await
            .ec2
            .describe_instances()
            .filters(Filter::builder().name(format!("tag:{}", tags::UID)).values(&target.owner.uid).build())
            .filters(live),
    };
    match aws.call("DescribeInstances", "", request.send()).await {
        Ok(out) => Ok(out.reservations().iter().flat_map(|r| r.instances().iter().cloned()).collect()),
        Err(err) if err.is("InvalidInstanceID.NotFound") => Ok(Vec::new()),
        Err(err) => Err(err.into()),
    }
}

#[async_trait]
impl MachineProvider for Ec2Machines {
    fn name(&self) -> &'static str {
        "ec2"
    }

    async fn observe(&self, target: &MachineTarget) -> Result<Option<Instance>, ProviderError> {
        let aws = self.clients(target).await?;
        let found = find(&aws, target).await?;
        Ok(found.first().map(|i| instance(i, SSH_PORT)))
    }

    fn check_create(&self, target: &MachineTarget) -> Result<(), ProviderError> {
        launch_place(target).map(|_| ())
    }

    async fn create(&self, target: &MachineTarget) -> Result<Instance, ProviderError> {
        let spec = Self::spec(target)?;
        let (subnet_id, security_group) = launch_place(target)?;
        let aws = self.clients(target).await?;
        let mut tag_instance = TagSpecification::builder().resource_type(ResourceType::Instance);
        let mut tag_volume = TagSpecification::builder().resource_type(ResourceType::Volume);
        for (k, v) in target.owner.tags("Machine").into_iter().chain(spec.tags.clone()) {
            tag_instance = tag_instance.tags(Tag::builder().key(&k).value(&v).build());
            tag_volume = tag_volume.tags(Tag::builder().key(k).value(v).build());
        }
        let mut run = aws
            .writing()
            .await
            .ec2
            .run_instances()
            .image_id(&spec.ami)
            .instance_type(InstanceType::from(spec.instance_type.as_str()))
            .subnet_id(subnet_id)
            .min_count(1)
            .max_count(1)
            .set_security_group_ids(security_group.map(|g| vec![g]))
            .set_key_name(target.key_name.clone())
            .tag_specifications(tag_instance.build())
            .tag_specifications(tag_volume.build());
        if let Some(root) = &spec.root_volume {
            run = run.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name("/dev/xvda")
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_size(root.size_gib)
                            .volume_type(VolumeType::from(super::ebs::type_name(root.volume_type).as_str()))
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            );
        }
        if let Some(data) = &spec.user_data {
            run = run.user_data(base64_encode(data.as_bytes()));
        }
        let request = run.customize().config_override(super::single_attempt()).send();
        let out = match aws.call("RunInstances", "(spec.provider.ec2)", request).await {
            Ok(out) => out,
            // The subnet, group and key were created moments ago by the
            // Network and KeyPair: reads lagging those creates, retried. An
            // unknown AMI is the spec's fault and still stalls.
            Err(err)
                if err.is("InvalidSubnetID.NotFound")
                    || err.is("InvalidGroup.NotFound")
                    || err.is("InvalidKeyPair.NotFound") =>
            {
                return Err(err.refused());
            }
            Err(err) => return Err(err.into()),
        };
        let created = out
            .instances()
            .first()
            .ok_or_else(|| ProviderError::Transient("RunInstances returned no instance".into()))?;
        Ok(instance(created, SSH_PORT))
    }

    async fn update(&self, target: &MachineTarget, current: Instance) -> Result<Instance, ProviderError> {
        let aws = self.clients(target).await?;
        let Some(id) = current.provider_id.as_deref().and_then(|p| p.rsplit('/').next()).map(str::to_owned) else {
            return Ok(current);
        };
        match (target.running, current.state) {
            (false, InstanceState::Running | InstanceState::Pending) => {
                let request = aws.writing().await.ec2.stop_instances().instance_ids(&id).send();
                aws.call("StopInstances", "(spec.running: false)", request).await?;
            }
            (true, InstanceState::Stopped) => {
                let request = aws.writing().await.ec2.start_instances().instance_ids(&id).send();
                aws.call("StartInstances", "(spec.running: true)", request).await?;
            }
            _ => return Ok(current),
        }
        Ok(find(&aws, target).await?.first().map(|i| instance(i, SSH_PORT)).unwrap_or(current))
    }

    async fn delete(&self, target: &MachineTarget) -> Result<(), ProviderError> {
        let aws = self.clients(target).await?;
        let ids: Vec<String> =
            find(&aws, target).await?.iter().filter_map(|i| i.instance_id().map(str::to_owned)).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let request = aws.writing().await.ec2.terminate_instances().set_instance_ids(Some(ids)).send();
        match aws.call("TerminateInstances", "", request).await {
            Ok(_) => Ok(()),
            Err(err) if err.is("InvalidInstanceID.NotFound") => Ok(()),
            Err(err) => Err(err.into()),
        }
    }
}

/// Standard base64, as EC2 expects user data.
fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}
