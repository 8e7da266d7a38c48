//! `S3Bucket`: an S3 bucket, also usable as a Nix binary cache.

use kube::core::{Message, Rule};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::network::ResourcePhase;
use super::{Condition, DeletionPolicy, LocalObjectReference, ManagementPolicy, Tags, rules};

/// An S3 bucket, the counterpart of NixOps `resources.s3Buckets`.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, PartialEq, KubeSchema)]
#[kube(
    group = "nixops.io",
    version = "v1alpha1",
    kind = "S3Bucket",
    namespaced,
    status = "S3BucketStatus",
    shortname = "nixbucket",
    category = "nixops",
    doc = "An S3 bucket with versioning, policy, public access block and tags; usable as a Nix binary cache.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Bucket", type_ = "string", json_path = ".status.bucketName"),
    printcolumn(name = "Region", type_ = "string", json_path = ".status.region"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = bucket_name_fixed_once_a_bucket_exists(),
    printcolumn(name = "Versioning", type_ = "boolean", json_path = ".spec.versioning", priority = 1),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct S3BucketSpec {
    /// The Network whose cloud account (region, credentials, endpoint) the
    /// bucket lives in. Immutable.
    #[x_kube(validation = rules::immutable("the Network"))]
    pub network_ref: LocalObjectReference,

    /// Bucket name, globally unique in S3; defaults to the bucket named by
    /// the `nixops.io/external-name` annotation, else
    /// `<namespace>-<name>-<hash of namespace/name>` (cut to 63 characters),
    /// and when that breaks a rule below, the S3Bucket stalls until this is
    /// set. A bucket of that name not tagged with this object's
    /// `nixops.io/uid` is never changed or deleted unless the annotation
    /// names it (adoption). AWS's naming rules apply: 3-63 lower-case letters, digits, '.' and
    /// '-', no '..', not an IP address, and none of the prefixes and
    /// suffixes AWS reserves (`xn--`, `sthree-`, `amzn-s3-demo-`,
    /// `-s3alias`, `--ol-s3`, `.mrap`, `--x-s3`, `--table-s3`).
    /// It can be added, changed or removed only while no bucket exists
    /// (`status.bucketName` is empty); after that only to name that bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = bucket_name_characters())]
    #[x_kube(validation = bucket_name_without_adjacent_periods())]
    #[x_kube(validation = bucket_name_not_an_ip_address())]
    #[x_kube(validation = bucket_name_not_reserved())]
    #[schemars(length(min = 3, max = 63))]
    pub bucket_name: Option<String>,

    /// Keep every version of every object.
    #[serde(default)]
    pub versioning: bool,

    /// Bucket policy as a JSON document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 20480))]
    pub policy: Option<String>,

    /// Public access block; everything is blocked unless relaxed here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_access_block: Option<PublicAccessBlock>,

    /// Tags for the bucket.
    #[serde(default, skip_serializing_if = "Tags::is_empty")]
    #[schemars(length(max = 40))]
    pub tags: Tags,

    /// Delete a bucket that still holds objects (all versions) on deletion.
    /// Without it, deleting a non-empty bucket waits with a Stalled condition.
    #[serde(default)]
    pub force_destroy: bool,

    /// `Default` creates, updates and deletes the cloud resource; `Observe`
    /// only reads the existing one named by the `nixops.io/external-name`
    /// annotation and never changes or deletes it. With that annotation and
    /// `Default`, an existing resource is adopted instead of created.
    #[serde(default)]
    pub management_policy: ManagementPolicy,

    /// `Delete` deletes the bucket with this object; `Orphan` keeps it and its data.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// S3 public access block settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublicAccessBlock {
    /// Reject new public ACLs.
    #[serde(default = "default_true")]
    pub block_public_acls: bool,
    /// Ignore existing public ACLs.
    #[serde(default = "default_true")]
    pub ignore_public_acls: bool,
    /// Reject public bucket policies.
    #[serde(default = "default_true")]
    pub block_public_policy: bool,
    /// Restrict access under public policies to the account.
    #[serde(default = "default_true")]
    pub restrict_public_buckets: bool,
}

fn default_true() -> bool {
    true
}

/// Observed state of an S3Bucket.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3BucketStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Summary of the bucket's lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ResourcePhase>,

    /// Ready, Reconciling, Stalled, Paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = rules::list_map("type"))]
    pub conditions: Vec<Condition>,

    /// The bucket's name in S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_name: Option<String>,

    /// The bucket's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,

    /// ARN of the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arn: Option<String>,
}

// AWS's rules for general purpose bucket names ("General purpose bucket
// naming rules" in the S3 User Guide). The schema checks spec.bucketName with
// the CEL rules below; the controller checks the name it derives from the
// object's namespace and name with `bucket_name_violation`, which applies the
// same rules and gives the same messages.

const CHARACTERS: &str = "must be a valid S3 bucket name: lower-case letters, digits, '.' and '-', starting and ending with a letter or digit";
const ADJACENT_PERIODS: &str = "must be a valid S3 bucket name: no two adjacent periods ('..')";
const IP_ADDRESS: &str = "must be a valid S3 bucket name: not formatted as an IP address, such as 192.168.5.4";
/// Four groups of digits: what S3 calls formatted as an IP address, leading
/// zeros and numbers above 255 included (CEL's `isIP` accepts neither).
const IP_ADDRESS_PATTERN: &str = "^[0-9]+([.][0-9]+){3}$";

/// Prefixes AWS reserves in bucket names, and for what.
/// `sthree-` covers `sthree-configurator`, which AWS also lists.
pub const RESERVED_PREFIXES: &[(&str, &str)] = &[
    ("xn--", "internationalized (Punycode) domain names"),
    ("sthree-", "S3 itself"),
    ("amzn-s3-demo-", "the examples in its documentation"),
];

/// Suffixes AWS reserves in bucket names, and for what.
pub const RESERVED_SUFFIXES: &[(&str, &str)] = &[
    ("-s3alias", "access point aliases"),
    ("--ol-s3", "Object Lambda Access Point aliases"),
    (".mrap", "Multi-Region Access Points"),
    ("--x-s3", "directory buckets"),
    ("--table-s3", "S3 table buckets"),
];

fn reserved_prefix_message(prefix: &str, what_for: &str) -> String {
    format!("must not start with '{prefix}': AWS reserves that prefix for {what_for}")
}

fn reserved_suffix_message(suffix: &str, what_for: &str) -> String {
    format!("must not end with '{suffix}': AWS reserves that suffix for {what_for}")
}

/// spec.bucketName may change freely until a bucket exists, so an S3Bucket
/// stalled on a default name S3 refuses can be given one; after that it may
/// only name the bucket in status (any other name would create a second
/// bucket and leave the first behind). A rule on the whole object, as it
/// reads status; the controller checks the same for CRDs without it.
fn bucket_name_fixed_once_a_bucket_exists() -> Rule {
    Rule::new(
        "(has(self.spec.bucketName) == has(oldSelf.spec.bucketName) \
           && (!has(self.spec.bucketName) || self.spec.bucketName == oldSelf.spec.bucketName)) \
         || !has(self.status) || !has(self.status.bucketName) \
         || (has(self.spec.bucketName) && self.spec.bucketName == self.status.bucketName)",
    )
    .message(
        "is immutable once the bucket exists (status.bucketName): another name, or none, would create a second bucket \
         and leave the first behind; delete this S3Bucket and create a new one for another bucket",
    )
    .field_path(".spec.bucketName")
}

/// Lower-case letters, digits, '.' and '-', a letter or digit at each end.
fn bucket_name_characters() -> Rule {
    Rule::new("self.matches('^[a-z0-9][a-z0-9.-]*[a-z0-9]$')").message(CHARACTERS)
}

fn bucket_name_without_adjacent_periods() -> Rule {
    Rule::new("!self.contains('..')").message(ADJACENT_PERIODS)
}

fn bucket_name_not_an_ip_address() -> Rule {
    Rule::new(format!("!self.matches('{IP_ADDRESS_PATTERN}')")).message(IP_ADDRESS)
}

/// None of the reserved prefixes and suffixes; the message names the one used.
fn bucket_name_not_reserved() -> Rule {
    let checks: Vec<(String, String)> = RESERVED_PREFIXES
        .iter()
        .map(|(prefix, what_for)| (format!("self.startsWith('{prefix}')"), reserved_prefix_message(prefix, what_for)))
        .chain(RESERVED_SUFFIXES.iter().map(|(suffix, what_for)| {
            (format!("self.endsWith('{suffix}')"), reserved_suffix_message(suffix, what_for))
        }))
        .collect();
    let rule = checks.iter().map(|(check, _)| format!("!{check}")).collect::<Vec<_>>().join(" && ");
    // Messages hold single quotes, so they are double-quoted CEL strings.
    let message = checks.iter().rev().fold(
        String::from("\"must not use a prefix or suffix AWS reserves in bucket names\""),
        |otherwise, (check, message)| format!("{check} ? \"{message}\" : {otherwise}"),
    );
    Rule::new(rule).message(Message::Expression(message))
}

/// Why S3 would refuse `name` as a bucket name, in the words the schema uses
/// for spec.bucketName, or `None` when S3 accepts it.
pub fn bucket_name_violation(name: &str) -> Option<String> {
    let letter_or_digit = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !(3..=63).contains(&name.len()) {
        return Some(format!("must be a valid S3 bucket name: 3 to 63 characters long, not {}", name.len()));
    }
    if !name.chars().all(|c| letter_or_digit(c) || c == '.' || c == '-')
        || !name.starts_with(letter_or_digit)
        || !name.ends_with(letter_or_digit)
    {
        return Some(CHARACTERS.to_owned());
    }
    if name.contains("..") {
        return Some(ADJACENT_PERIODS.to_owned());
    }
    let groups: Vec<&str> = name.split('.').collect();
    if groups.len() == 4 && groups.iter().all(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit())) {
        return Some(IP_ADDRESS.to_owned());
    }
    if let Some((prefix, what_for)) = RESERVED_PREFIXES.iter().find(|(prefix, _)| name.starts_with(prefix)) {
        return Some(reserved_prefix_message(prefix, what_for));
    }
    if let Some((suffix, what_for)) = RESERVED_SUFFIXES.iter().find(|(suffix, _)| name.ends_with(suffix)) {
        return Some(reserved_suffix_message(suffix, what_for));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_s3_refuses_are_named_with_the_rule_they_break() {
        for ok in
            ["nix-cache", "abc", "my.bucket.example", "team-a-xn--cache", "s3alias", "a-mrap", "1.2.3", "1.2.3.4.5"]
        {
            assert_eq!(bucket_name_violation(ok), None, "{ok}");
        }
        let max = "a".repeat(63);
        assert_eq!(bucket_name_violation(&max), None);
        for (bad, rule) in [
            ("ab", "3 to 63 characters"),
            (&*"a".repeat(64), "3 to 63 characters"),
            ("My_Bucket", "lower-case letters"),
            ("-cache", "starting and ending"),
            ("cache.", "starting and ending"),
            ("a..b", "adjacent periods"),
            ("192.168.5.4", "IP address"),
            ("192.168.05.4", "IP address"),
            ("999.1.1.1", "IP address"),
            ("xn--bcher-kva", "start with 'xn--'"),
            ("sthree-cache", "start with 'sthree-'"),
            ("sthree-configurator-x", "start with 'sthree-'"),
            ("amzn-s3-demo-bucket", "start with 'amzn-s3-demo-'"),
            ("cache-s3alias", "end with '-s3alias'"),
            ("cache--ol-s3", "end with '--ol-s3'"),
            ("cache.mrap", "end with '.mrap'"),
            ("cache--x-s3", "end with '--x-s3'"),
            ("cache--table-s3", "end with '--table-s3'"),
        ] {
            let message = bucket_name_violation(bad).unwrap_or_else(|| panic!("{bad} must be refused"));
            assert!(message.contains(rule), "{bad}: {message}");
        }
    }
}
