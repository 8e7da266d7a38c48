//! A Network's physical network on EC2: VPC, subnets, internet gateway with
//! a default route, and one security group whose ingress rules converge to
//! the spec (added and removed). Every resource carries the owner's tags.

use std::collections::BTreeSet;

use aws_sdk_ec2::types::{
    AttributeBooleanValue, Filter, InternetGateway, IpPermission, IpRange, ResourceType, SecurityGroup, Tag,
    TagSpecification,
};

use super::{AwsClients, AwsError, tags};
use crate::api::network::{Ec2Network, IpProtocol, SubnetStatus};
use crate::provider::{NetworkPart, NetworkResources, NetworkState, Owner, ProviderError};

/// Tag naming a subnet after its spec entry.
const SUBNET_TAG: &str = "nixops.io/subnet";

fn tag_spec(owner: &Owner, resource: ResourceType, extra: &[(&str, &str)]) -> TagSpecification {
    let mut builder = TagSpecification::builder().resource_type(resource);
    for (k, v) in owner.tags("Network") {
        builder = builder.tags(Tag::builder().key(k).value(v).build());
    }
    for (k, v) in extra {
        builder = builder.tags(Tag::builder().key(*k).value(*v).build());
    }
    builder.build()
}

fn by_owner(owner: &Owner) -> Filter {
    Filter::builder().name(format!("tag:{}", tags::UID)).values(&owner.uid).build()
}

fn in_vpc(vpc_id: &str) -> Filter {
    Filter::builder().name("vpc-id").values(vpc_id).build()
}

/// The security group's name for a Network.
pub fn security_group_name(owner: &Owner) -> String {
    format!("nixops-{}-{}", owner.namespace, owner.name)
}

/// A rule as a comparable tuple: (protocol, from, to, cidr).
type Rule = (String, i32, i32, String);

fn desired_rules(spec: &Ec2Network) -> BTreeSet<Rule> {
    let mut rules = BTreeSet::new();
    for r in spec.security_group.iter().flat_map(|sg| &sg.ingress) {
        let (proto, from, to) = match r.protocol {
            IpProtocol::Tcp => ("tcp", r.from_port.unwrap_or(0), r.to_port.unwrap_or(65535)),
            IpProtocol::Udp => ("udp", r.from_port.unwrap_or(0), r.to_port.unwrap_or(65535)),
            IpProtocol::Icmp => ("icmp", -1, -1),
            IpProtocol::All => ("-1", -1, -1),
        };
        for cidr in &r.cidr_blocks {
            rules.insert((proto.to_owned(), from, to, cidr.clone()));
        }
    }
    rules
}

/// `spec` with an ingress rule for the mesh's UDP port from anywhere when
/// the Network has a mesh: members on other clouds reach the port over
/// the internet, and WireGuard answers no packet that does not carry a
/// member's key.
pub fn with_mesh_port(spec: &Ec2Network, mesh: Option<&crate::api::network::MeshSpec>) -> Ec2Network {
    let mut spec = spec.clone();
    if let Some(wg) = mesh.and_then(|m| m.wireguard.as_ref()) {
        spec.security_group.get_or_insert_with(Default::default).ingress.push(crate::api::network::IngressRule {
            protocol: IpProtocol::Udp,
            from_port: Some(wg.listen_port),
            to_port: Some(wg.listen_port),
            cidr_blocks: vec!["0.0.0.0/0".into()],
            description: Some("nixops-operator WireGuard mesh".into()),
        });
    }
    spec
}

fn permission((proto, from, to, cidr): &Rule) -> IpPermission {
    IpPermission::builder()
        .ip_protocol(proto)
        .from_port(*from)
        .to_port(*to)
        .ip_ranges(IpRange::builder().cidr_ip(cidr).build())
        .build()
}

/// Finds the Network's VPC: the one named by `known` (adoption), else by the UID tag.
pub async fn find_vpc(aws: &AwsClients, owner: &Owner, known: Option<&str>) -> Result<Option<String>, ProviderError> {
    let request = match known {
        Some(id) => aws.reading().await.ec2.describe_vpcs().vpc_ids(id),
        None if crate::fault::lookup_lags() => return Ok(None),
        None => aws.reading().await.ec2.describe_vpcs().filters(by_owner(owner)),
    };
    match aws.call("DescribeVpcs", "", request.send()).await {
        Ok(out) => Ok(out.vpcs().iter().find_map(|v| v.vpc_id().map(str::to_owned))),
        Err(err) if err.is("InvalidVpcID.NotFound") => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Finds each part of the Network in creation order (VPC, subnets,
/// internet gateway, security group) and converges the ones that exist to
/// the spec; stops at the first part that does not exist, which the caller
/// creates ([`create`]) under its create-pending mark.
pub async fn ensure(
    aws: &AwsClients,
    owner: &Owner,
    spec: &Ec2Network,
    known: Option<&str>,
) -> Result<NetworkState, ProviderError> {
    let mut state = NetworkState::default();
    let missing = |mut state: NetworkState, part| {
        state.missing = Some(part);
        Ok(state)
    };

    // VPC.
    let Some(vpc_id) = find_vpc(aws, owner, known).await? else {
        if let Some(id) = known {
            return Err(ProviderError::permanent(
                "VpcNotFound",
                format!(
                    "VPC {id} named by the nixops.io/external-name annotation does not exist; fix or remove the annotation"
                ),
            ));
        }
        return missing(state, NetworkPart::Vpc);
    };
    state.resources.vpc_id = vpc_id.clone();
    state.found.push(NetworkPart::Vpc);

    // Subnets, matched by name tag; ones no longer in the spec are deleted.
    let existing = if crate::fault::lookup_lags() {
        Vec::new()
    } else {
        let request = aws.reading().await.ec2.describe_subnets().filters(in_vpc(&vpc_id)).send();
        aws.call("DescribeSubnets", "", request).await?.subnets().to_vec()
    };
    let named = |s: &aws_sdk_ec2::types::Subnet| {
        s.tags().iter().find(|t| t.key() == Some(SUBNET_TAG)).and_then(|t| t.value()).map(str::to_owned)
    };
    for want in &spec.subnets {
        let Some(subnet) = existing.iter().find(|s| named(s).as_deref() == Some(want.name.as_str())) else {
            return missing(state, NetworkPart::Subnet(want.name.clone()));
        };
        let id = subnet.subnet_id().unwrap_or_default().to_owned();
        // Converged, not set once after the create: a crash in between, or
        // a change of spec.subnets[].public, would leave it wrong.
        if subnet.map_public_ip_on_launch().unwrap_or(false) != want.public {
            let request = aws
                .writing()
                .await
                .ec2
                .modify_subnet_attribute()
                .subnet_id(&id)
                .map_public_ip_on_launch(AttributeBooleanValue::builder().value(want.public).build())
                .send();
            aws.call("ModifySubnetAttribute", format!("{id} MapPublicIpOnLaunch={}", want.public), request)
                .await
                .map_err(AwsError::retry_not_found)?;
        }
        state.resources.subnets.push(SubnetStatus { name: want.name.clone(), id });
        state.found.push(NetworkPart::Subnet(want.name.clone()));
    }
    for stale in existing.iter().filter(|s| named(s).is_some_and(|n| !spec.subnets.iter().any(|w| w.name == n))) {
        let id = stale.subnet_id().unwrap_or_default();
        match aws.call("DeleteSubnet", id, aws.writing().await.ec2.delete_subnet().subnet_id(id).send()).await {
            Ok(_) => {}
            Err(err) if err.is("InvalidSubnetID.NotFound") => {}
            Err(err) => return Err(err.context("removed from spec.provider.ec2.subnets")),
        }
    }

    // Internet gateway and default route, when any subnet is public.
    if spec.subnets.iter().any(|s| s.public) {
        let Some(igw) = find_internet_gateway(aws, owner, &vpc_id).await? else {
            return missing(state, NetworkPart::InternetGateway);
        };
        let igw_id = igw.internet_gateway_id().unwrap_or_default().to_owned();
        // Created and attached in two calls: a crash in between leaves it
        // detached, and this attaches it.
        if !igw.attachments().iter().any(|a| a.vpc_id() == Some(vpc_id.as_str())) {
            let request =
                aws.writing().await.ec2.attach_internet_gateway().internet_gateway_id(&igw_id).vpc_id(&vpc_id).send();
            match aws.call("AttachInternetGateway", format!("{igw_id} to {vpc_id}"), request).await {
                Ok(_) => {}
                Err(err) if err.is("Resource.AlreadyAssociated") => {}
                Err(err) => return Err(err.retry_not_found()),
            }
        }
        let main = Filter::builder().name("association.main").values("true").build();
        let request = aws.reading().await.ec2.describe_route_tables().filters(in_vpc(&vpc_id)).filters(main).send();
        let tables = aws.call("DescribeRouteTables", "", request).await?;
        if let Some(table) = tables.route_tables().first() {
            let has_default = table.routes().iter().any(|r| r.destination_cidr_block() == Some("0.0.0.0/0"));
            if !has_default {
                let request = aws
                    .writing()
                    .await
                    .ec2
                    .create_route()
                    .route_table_id(table.route_table_id().unwrap_or_default())
                    .destination_cidr_block("0.0.0.0/0")
                    .gateway_id(&igw_id)
                    .send();
                match aws.call("CreateRoute", "0.0.0.0/0", request).await {
                    Ok(_) => {}
                    Err(err) if err.is("RouteAlreadyExists") => {}
                    Err(err) => return Err(err.retry_not_found()),
                }
            }
        }
        state.resources.internet_gateway_id = Some(igw_id);
        state.found.push(NetworkPart::InternetGateway);
    }

    // Security group and its ingress rules.
    let Some(group) = find_security_group(aws, owner, &vpc_id).await? else {
        return missing(state, NetworkPart::SecurityGroup);
    };
    let sg_id = group.group_id().unwrap_or_default().to_owned();
    let mut current = BTreeSet::new();
    for p in group.ip_permissions() {
        for r in p.ip_ranges() {
            current.insert((
                p.ip_protocol().unwrap_or("-1").to_owned(),
                p.from_port().unwrap_or(-1),
                p.to_port().unwrap_or(-1),
                r.cidr_ip().unwrap_or_default().to_owned(),
            ));
        }
    }
    let desired = desired_rules(spec);
    let add: Vec<IpPermission> = desired.difference(&current).map(permission).collect();
    let remove: Vec<IpPermission> = current.difference(&desired).map(permission).collect();
    if !add.is_empty() {
        let request = aws
            .writing()
            .await
            .ec2
            .authorize_security_group_ingress()
            .group_id(&sg_id)
            .set_ip_permissions(Some(add))
            .send();
        match aws.call("AuthorizeSecurityGroupIngress", "(spec.provider.ec2.securityGroup)", request).await {
            Ok(_) => {}
            // A rule the last (lost) answer added already.
            Err(err) if err.is("InvalidPermission.Duplicate") => {}
            Err(err) => return Err(err.retry_not_found()),
        }
    }
    if !remove.is_empty() {
        let request = aws
            .writing()
            .await
            .ec2
            .revoke_security_group_ingress()
            .group_id(&sg_id)
            .set_ip_permissions(Some(remove))
            .send();
        match aws.call("RevokeSecurityGroupIngress", "", request).await {
            Ok(_) => {}
            Err(err) if err.is("InvalidPermission.NotFound") => {}
            Err(err) => return Err(err.into()),
        }
    }
    state.resources.security_group_id = Some(sg_id);
    state.found.push(NetworkPart::SecurityGroup);
    Ok(state)
}

/// The Network's internet gateway: the one tagged with its UID (attached or
/// not), else the one attached to its VPC (an adopted VPC's).
async fn find_internet_gateway(
    aws: &AwsClients,
    owner: &Owner,
    vpc_id: &str,
) -> Result<Option<InternetGateway>, ProviderError> {
    if !crate::fault::lookup_lags() {
        let request = aws.reading().await.ec2.describe_internet_gateways().filters(by_owner(owner)).send();
        let tagged = aws.call("DescribeInternetGateways", "", request).await?;
        if let Some(g) = tagged.internet_gateways().first() {
            return Ok(Some(g.clone()));
        }
    }
    let attached = Filter::builder().name("attachment.vpc-id").values(vpc_id).build();
    let request = aws.reading().await.ec2.describe_internet_gateways().filters(attached).send();
    let igws = aws.call("DescribeInternetGateways", "", request).await?;
    Ok(igws.internet_gateways().first().cloned())
}

/// The Network's security group, by its name within the VPC.
async fn find_security_group(
    aws: &AwsClients,
    owner: &Owner,
    vpc_id: &str,
) -> Result<Option<SecurityGroup>, ProviderError> {
    if crate::fault::lookup_lags() {
        return Ok(None);
    }
    let by_name = Filter::builder().name("group-name").values(security_group_name(owner)).build();
    let request = aws.reading().await.ec2.describe_security_groups().filters(in_vpc(vpc_id)).filters(by_name).send();
    Ok(aws.call("DescribeSecurityGroups", "", request).await?.security_groups().first().cloned())
}

/// Creates one part of the Network, tagged with its owner in the same call;
/// `found` holds the parts before it. Returns the new resource's ID.
pub async fn create(
    aws: &AwsClients,
    owner: &Owner,
    spec: &Ec2Network,
    part: &NetworkPart,
    found: &NetworkResources,
) -> Result<String, ProviderError> {
    let vpc_id = &found.vpc_id;
    // Single attempts: an endpoint that ignores ClientToken would make a
    // second resource when an answer is lost; the caller looks first.
    match part {
        NetworkPart::Vpc => {
            let request = aws
                .writing()
                .await
                .ec2
                .create_vpc()
                .cidr_block(&spec.vpc.cidr_block)
                .tag_specifications(tag_spec(owner, ResourceType::Vpc, &[]))
                .customize()
                .config_override(super::single_attempt())
                .send();
            let out = aws.call("CreateVpc", "(spec.provider.ec2.vpc)", request).await?;
            Ok(out.vpc().and_then(|v| v.vpc_id()).unwrap_or_default().to_owned())
        }
        NetworkPart::Subnet(name) => {
            let want = spec.subnets.iter().find(|s| s.name == *name).ok_or_else(|| {
                ProviderError::Transient(format!("subnet {name} is no longer in spec.provider.ec2.subnets"))
            })?;
            let request = aws
                .writing()
                .await
                .ec2
                .create_subnet()
                .vpc_id(vpc_id)
                .cidr_block(&want.cidr_block)
                .availability_zone(&want.zone)
                .tag_specifications(tag_spec(owner, ResourceType::Subnet, &[(SUBNET_TAG, &want.name)]))
                .customize()
                .config_override(super::single_attempt())
                .send();
            let out = aws
                .call("CreateSubnet", format!("{name} (spec.provider.ec2.subnets)"), request)
                .await
                .map_err(AwsError::retry_not_found)?;
            Ok(out.subnet().and_then(|s| s.subnet_id()).unwrap_or_default().to_owned())
        }
        NetworkPart::InternetGateway => {
            let request = aws
                .writing()
                .await
                .ec2
                .create_internet_gateway()
                .tag_specifications(tag_spec(owner, ResourceType::InternetGateway, &[]))
                .customize()
                .config_override(super::single_attempt())
                .send();
            let out = aws.call("CreateInternetGateway", "", request).await?;
            Ok(out.internet_gateway().and_then(|g| g.internet_gateway_id()).unwrap_or_default().to_owned())
        }
        NetworkPart::SecurityGroup => {
            let request = aws
                .writing()
                .await
                .ec2
                .create_security_group()
                .group_name(security_group_name(owner))
                .description(format!("nixops-operator Network {}/{}", owner.namespace, owner.name))
                .vpc_id(vpc_id)
                .tag_specifications(tag_spec(owner, ResourceType::SecurityGroup, &[]))
                .customize()
                .config_override(super::single_attempt())
                .send();
            match aws.call("CreateSecurityGroup", "", request).await {
                Ok(out) => Ok(out.group_id().unwrap_or_default().to_owned()),
                // The name is unique in the VPC: the lookup before lagged.
                Err(err) if err.is("InvalidGroup.Duplicate") => Err(err.refused()),
                Err(err) => Err(err.retry_not_found()),
            }
        }
    }
}

/// Deletes the Network's resources in dependency order; what is already gone is skipped.
pub async fn delete(aws: &AwsClients, owner: &Owner, known: Option<&str>) -> Result<(), ProviderError> {
    // A gateway is created before it is attached: one a crash left detached
    // is found by its tag alone.
    let request = aws.reading().await.ec2.describe_internet_gateways().filters(by_owner(owner)).send();
    let mut igws = aws.call("DescribeInternetGateways", "", request).await?.internet_gateways().to_vec();
    let Some(vpc_id) = find_vpc(aws, owner, known).await? else {
        for g in &igws {
            delete_internet_gateway(aws, g).await?;
        }
        return Ok(());
    };
    let request = aws.reading().await.ec2.describe_security_groups().filters(in_vpc(&vpc_id)).send();
    let groups = aws.call("DescribeSecurityGroups", "", request).await?;
    for g in groups.security_groups().iter().filter(|g| g.group_name() != Some("default")) {
        let id = g.group_id().unwrap_or_default();
        match aws
            .call("DeleteSecurityGroup", id, aws.writing().await.ec2.delete_security_group().group_id(id).send())
            .await
        {
            Ok(_) => {}
            Err(err) if err.is("InvalidGroup.NotFound") => {}
            Err(err) => return Err(err.into()),
        }
    }
    let request = aws.reading().await.ec2.describe_subnets().filters(in_vpc(&vpc_id)).send();
    let subnets = aws.call("DescribeSubnets", "", request).await?;
    for s in subnets.subnets() {
        let id = s.subnet_id().unwrap_or_default();
        match aws.call("DeleteSubnet", id, aws.writing().await.ec2.delete_subnet().subnet_id(id).send()).await {
            Ok(_) => {}
            Err(err) if err.is("InvalidSubnetID.NotFound") => {}
            Err(err) => return Err(err.into()),
        }
    }
    let attached = Filter::builder().name("attachment.vpc-id").values(&vpc_id).build();
    let request = aws.reading().await.ec2.describe_internet_gateways().filters(attached).send();
    for g in aws.call("DescribeInternetGateways", "", request).await?.internet_gateways() {
        if !igws.iter().any(|t| t.internet_gateway_id() == g.internet_gateway_id()) {
            igws.push(g.clone());
        }
    }
    for g in &igws {
        delete_internet_gateway(aws, g).await?;
    }
    match aws.call("DeleteVpc", &vpc_id, aws.writing().await.ec2.delete_vpc().vpc_id(&vpc_id).send()).await {
        Ok(_) => Ok(()),
        Err(err) if err.is("InvalidVpcID.NotFound") => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Detaches a gateway from every VPC it is attached to, then deletes it.
async fn delete_internet_gateway(aws: &AwsClients, gateway: &InternetGateway) -> Result<(), ProviderError> {
    let id = gateway.internet_gateway_id().unwrap_or_default();
    for vpc in gateway.attachments().iter().filter_map(|a| a.vpc_id()) {
        let request = aws.writing().await.ec2.detach_internet_gateway().internet_gateway_id(id).vpc_id(vpc).send();
        match aws.call("DetachInternetGateway", format!("{id} from {vpc}"), request).await {
            Ok(_) => {}
            Err(err) if err.is("Gateway.NotAttached") || err.is_not_found() => {}
            Err(err) => return Err(err.into()),
        }
    }
    match aws
        .call(
            "DeleteInternetGateway",
            id,
            aws.writing().await.ec2.delete_internet_gateway().internet_gateway_id(id).send(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(err) if err.is("InvalidInternetGatewayID.NotFound") => Ok(()),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_port_is_open_only_with_a_mesh() {
        let spec: Ec2Network = serde_json::from_value(serde_json::json!({
            "region": "eu-west-1", "vpc": {"cidrBlock": "10.0.0.0/16"},
            "subnets": [{"name": "a", "cidrBlock": "10.0.1.0/24", "zone": "eu-west-1a"}],
            "securityGroup": {"ingress": [{"protocol": "tcp", "fromPort": 22, "toPort": 22, "cidrBlocks": ["0.0.0.0/0"]}]}
        }))
        .unwrap();
        let mesh: crate::api::network::MeshSpec = serde_json::from_value(
            serde_json::json!({"wireguard": {"addressRange": "10.77.0.0/24", "listenPort": 51999}}),
        )
        .unwrap();
        assert_eq!(desired_rules(&with_mesh_port(&spec, None)), desired_rules(&spec));
        let rules = desired_rules(&with_mesh_port(&spec, Some(&mesh)));
        assert!(rules.contains(&("udp".to_owned(), 51999, 51999, "0.0.0.0/0".to_owned())), "{rules:?}");
        assert!(rules.contains(&("tcp".to_owned(), 22, 22, "0.0.0.0/0".to_owned())));
    }
}
