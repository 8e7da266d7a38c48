//! A Network's physical network on EC2: VPC, subnets, internet gateway with
//! a default route, and one security group whose ingress rules converge to
//! the spec (added and removed). Every resource carries the owner's tags.

use std::collections::BTreeSet;

use aws_sdk_ec2::types::{Filter, IpPermission, IpRange, ResourceType, Tag, TagSpecification};

use super::{AwsClients, classify, error_code, owner_tags, tags};
use crate::api::network::{Ec2Network, IpProtocol, SubnetStatus};
use crate::provider::{Owner, ProviderError};

/// Tag naming a subnet after its spec entry.
const SUBNET_TAG: &str = "nixops.io/subnet";

/// What exists for a Network.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkResources {
    pub vpc_id: String,
    pub subnets: Vec<SubnetStatus>,
    pub internet_gateway_id: Option<String>,
    pub security_group_id: Option<String>,
}

fn tag_spec(owner: &Owner, resource: ResourceType, extra: &[(&str, &str)]) -> TagSpecification {
    let mut builder = TagSpecification::builder().resource_type(resource);
    for (k, v) in owner_tags(owner, "Network") {
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
        None => aws.reading().await.ec2.describe_vpcs().filters(by_owner(owner)),
    };
    match request.send().await {
        Ok(out) => Ok(out.vpcs().iter().find_map(|v| v.vpc_id().map(str::to_owned))),
        Err(err) if error_code(&err) == Some("InvalidVpcID.NotFound") => Ok(None),
        Err(err) => Err(classify(err, "DescribeVpcs")),
    }
}

/// Creates what is missing and converges what exists.
pub async fn ensure(
    aws: &AwsClients,
    owner: &Owner,
    spec: &Ec2Network,
    known: Option<&str>,
) -> Result<NetworkResources, ProviderError> {
    // VPC.
    let vpc_id = match find_vpc(aws, owner, known).await? {
        Some(id) => id,
        None if known.is_some() => {
            return Err(ProviderError::permanent(
                "VpcNotFound",
                format!(
                    "VPC {} named by the nixops.io/external-name annotation does not exist; fix or remove the annotation",
                    known.unwrap_or_default()
                ),
            ));
        }
        None => {
            let out = aws
                .writing()
                .await
                .ec2
                .create_vpc()
                .cidr_block(&spec.vpc.cidr_block)
                .tag_specifications(tag_spec(owner, ResourceType::Vpc, &[]))
                .customize()
                .config_override(super::single_attempt())
                .send()
                .await
                .map_err(|e| classify(e, "CreateVpc (spec.provider.ec2.vpc)"))?;
            out.vpc().and_then(|v| v.vpc_id()).unwrap_or_default().to_owned()
        }
    };

    // Subnets, matched by name tag; ones no longer in the spec are deleted.
    let existing = aws
        .reading()
        .await
        .ec2
        .describe_subnets()
        .filters(in_vpc(&vpc_id))
        .send()
        .await
        .map_err(|e| classify(e, "DescribeSubnets"))?;
    let named = |s: &aws_sdk_ec2::types::Subnet| {
        s.tags().iter().find(|t| t.key() == Some(SUBNET_TAG)).and_then(|t| t.value()).map(str::to_owned)
    };
    let mut subnets = Vec::new();
    for want in &spec.subnets {
        let id = match existing.subnets().iter().find(|s| named(s).as_deref() == Some(want.name.as_str())) {
            Some(s) => s.subnet_id().unwrap_or_default().to_owned(),
            None => {
                let out = aws
                    .writing()
                    .await
                    .ec2
                    .create_subnet()
                    .vpc_id(&vpc_id)
                    .cidr_block(&want.cidr_block)
                    .availability_zone(&want.zone)
                    .tag_specifications(tag_spec(owner, ResourceType::Subnet, &[(SUBNET_TAG, &want.name)]))
                    .customize()
                    .config_override(super::single_attempt())
                    .send()
                    .await
                    .map_err(|e| classify(e, &format!("CreateSubnet {} (spec.provider.ec2.subnets)", want.name)))?;
                let id = out.subnet().and_then(|s| s.subnet_id()).unwrap_or_default().to_owned();
                if want.public {
                    aws.writing()
                        .await
                        .ec2
                        .modify_subnet_attribute()
                        .subnet_id(&id)
                        .map_public_ip_on_launch(
                            aws_sdk_ec2::types::AttributeBooleanValue::builder().value(true).build(),
                        )
                        .send()
                        .await
                        .map_err(|e| classify(e, "ModifySubnetAttribute"))?;
                }
                id
            }
        };
        subnets.push(SubnetStatus { name: want.name.clone(), id });
    }
    for stale in
        existing.subnets().iter().filter(|s| named(s).is_some_and(|n| !spec.subnets.iter().any(|w| w.name == n)))
    {
        let id = stale.subnet_id().unwrap_or_default();
        match aws.writing().await.ec2.delete_subnet().subnet_id(id).send().await {
            Ok(_) => {}
            Err(err) if error_code(&err) == Some("InvalidSubnetID.NotFound") => {}
            Err(err) => {
                return Err(classify(err, &format!("DeleteSubnet {id} (removed from spec.provider.ec2.subnets)")));
            }
        }
    }

    // Internet gateway and default route, when any subnet is public.
    let mut internet_gateway_id = None;
    if spec.subnets.iter().any(|s| s.public) {
        let attached = Filter::builder().name("attachment.vpc-id").values(&vpc_id).build();
        let igws = aws
            .reading()
            .await
            .ec2
            .describe_internet_gateways()
            .filters(attached)
            .send()
            .await
            .map_err(|e| classify(e, "DescribeInternetGateways"))?;
        let igw = match igws.internet_gateways().iter().find_map(|g| g.internet_gateway_id()) {
            Some(id) => id.to_owned(),
            None => {
                let out = aws
                    .writing()
                    .await
                    .ec2
                    .create_internet_gateway()
                    .tag_specifications(tag_spec(owner, ResourceType::InternetGateway, &[]))
                    .customize()
                    .config_override(super::single_attempt())
                    .send()
                    .await
                    .map_err(|e| classify(e, "CreateInternetGateway"))?;
                let id = out.internet_gateway().and_then(|g| g.internet_gateway_id()).unwrap_or_default().to_owned();
                aws.writing()
                    .await
                    .ec2
                    .attach_internet_gateway()
                    .internet_gateway_id(&id)
                    .vpc_id(&vpc_id)
                    .send()
                    .await
                    .map_err(|e| classify(e, "AttachInternetGateway"))?;
                id
            }
        };
        let main = Filter::builder().name("association.main").values("true").build();
        let tables = aws
            .reading()
            .await
            .ec2
            .describe_route_tables()
            .filters(in_vpc(&vpc_id))
            .filters(main)
            .send()
            .await
            .map_err(|e| classify(e, "DescribeRouteTables"))?;
        if let Some(table) = tables.route_tables().first() {
            let has_default = table.routes().iter().any(|r| r.destination_cidr_block() == Some("0.0.0.0/0"));
            if !has_default {
                match aws
                    .writing()
                    .await
                    .ec2
                    .create_route()
                    .route_table_id(table.route_table_id().unwrap_or_default())
                    .destination_cidr_block("0.0.0.0/0")
                    .gateway_id(&igw)
                    .send()
                    .await
                {
                    Ok(_) => {}
                    Err(err) if error_code(&err) == Some("RouteAlreadyExists") => {}
                    Err(err) => return Err(classify(err, "CreateRoute 0.0.0.0/0")),
                }
            }
        }
        internet_gateway_id = Some(igw);
    }

    // Security group and its ingress rules.
    let group_name = security_group_name(owner);
    let by_name = Filter::builder().name("group-name").values(&group_name).build();
    let groups = aws
        .reading()
        .await
        .ec2
        .describe_security_groups()
        .filters(in_vpc(&vpc_id))
        .filters(by_name)
        .send()
        .await
        .map_err(|e| classify(e, "DescribeSecurityGroups"))?;
    let (sg_id, current): (String, BTreeSet<Rule>) = match groups.security_groups().first() {
        Some(g) => {
            let mut rules = BTreeSet::new();
            for p in g.ip_permissions() {
                for r in p.ip_ranges() {
                    rules.insert((
                        p.ip_protocol().unwrap_or("-1").to_owned(),
                        p.from_port().unwrap_or(-1),
                        p.to_port().unwrap_or(-1),
                        r.cidr_ip().unwrap_or_default().to_owned(),
                    ));
                }
            }
            (g.group_id().unwrap_or_default().to_owned(), rules)
        }
        None => {
            let out = aws
                .writing()
                .await
                .ec2
                .create_security_group()
                .group_name(&group_name)
                .description(format!("nixops-operator Network {}/{}", owner.namespace, owner.name))
                .vpc_id(&vpc_id)
                .tag_specifications(tag_spec(owner, ResourceType::SecurityGroup, &[]))
                .customize()
                .config_override(super::single_attempt())
                .send()
                .await
                .map_err(|e| classify(e, "CreateSecurityGroup"))?;
            (out.group_id().unwrap_or_default().to_owned(), BTreeSet::new())
        }
    };
    let desired = desired_rules(spec);
    let add: Vec<IpPermission> = desired.difference(&current).map(permission).collect();
    let remove: Vec<IpPermission> = current.difference(&desired).map(permission).collect();
    if !add.is_empty() {
        aws.writing()
            .await
            .ec2
            .authorize_security_group_ingress()
            .group_id(&sg_id)
            .set_ip_permissions(Some(add))
            .send()
            .await
            .map_err(|e| classify(e, "AuthorizeSecurityGroupIngress (spec.provider.ec2.securityGroup)"))?;
    }
    if !remove.is_empty() {
        aws.writing()
            .await
            .ec2
            .revoke_security_group_ingress()
            .group_id(&sg_id)
            .set_ip_permissions(Some(remove))
            .send()
            .await
            .map_err(|e| classify(e, "RevokeSecurityGroupIngress"))?;
    }

    Ok(NetworkResources { vpc_id, subnets, internet_gateway_id, security_group_id: Some(sg_id) })
}

/// Deletes the Network's resources in dependency order; what is already gone is skipped.
pub async fn delete(aws: &AwsClients, owner: &Owner, known: Option<&str>) -> Result<(), ProviderError> {
    let Some(vpc_id) = find_vpc(aws, owner, known).await? else { return Ok(()) };
    let groups = aws
        .reading()
        .await
        .ec2
        .describe_security_groups()
        .filters(in_vpc(&vpc_id))
        .send()
        .await
        .map_err(|e| classify(e, "DescribeSecurityGroups"))?;
    for g in groups.security_groups().iter().filter(|g| g.group_name() != Some("default")) {
        match aws.writing().await.ec2.delete_security_group().group_id(g.group_id().unwrap_or_default()).send().await {
            Ok(_) => {}
            Err(err) if error_code(&err) == Some("InvalidGroup.NotFound") => {}
            Err(err) => return Err(classify(err, "DeleteSecurityGroup")),
        }
    }
    let subnets = aws
        .reading()
        .await
        .ec2
        .describe_subnets()
        .filters(in_vpc(&vpc_id))
        .send()
        .await
        .map_err(|e| classify(e, "DescribeSubnets"))?;
    for s in subnets.subnets() {
        match aws.writing().await.ec2.delete_subnet().subnet_id(s.subnet_id().unwrap_or_default()).send().await {
            Ok(_) => {}
            Err(err) if error_code(&err) == Some("InvalidSubnetID.NotFound") => {}
            Err(err) => return Err(classify(err, "DeleteSubnet")),
        }
    }
    let attached = Filter::builder().name("attachment.vpc-id").values(&vpc_id).build();
    let igws = aws
        .reading()
        .await
        .ec2
        .describe_internet_gateways()
        .filters(attached)
        .send()
        .await
        .map_err(|e| classify(e, "DescribeInternetGateways"))?;
    for g in igws.internet_gateways() {
        let id = g.internet_gateway_id().unwrap_or_default();
        let _ = aws.writing().await.ec2.detach_internet_gateway().internet_gateway_id(id).vpc_id(&vpc_id).send().await;
        match aws.writing().await.ec2.delete_internet_gateway().internet_gateway_id(id).send().await {
            Ok(_) => {}
            Err(err) if error_code(&err) == Some("InvalidInternetGatewayID.NotFound") => {}
            Err(err) => return Err(classify(err, "DeleteInternetGateway")),
        }
    }
    match aws.writing().await.ec2.delete_vpc().vpc_id(&vpc_id).send().await {
        Ok(_) => Ok(()),
        Err(err) if error_code(&err) == Some("InvalidVpcID.NotFound") => Ok(()),
        Err(err) => Err(classify(err, "DeleteVpc")),
    }
}
