//! CEL validation rules the API server enforces (`x-kubernetes-validations`).
//!
//! The API server prefixes each message with the path of the field it is
//! attached to, so a message says what is allowed and how to fix it.
//! Strings checked here carry a `maxLength` in their schema, and lists a
//! `maxItems`, to keep the rules within the API server's CEL cost budget.

use kube::core::cel::{ListMerge, MergeStrategy};
use kube::core::{Message, Rule};

/// Nix base32: digits and lower-case letters without e, o, u and t.
pub const STORE_PATH_PATTERN: &str = "^/nix/store/[0-9abcdfghijklmnpqrsvwxyz]{32}-[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]*$";

/// A Kubernetes object name (DNS subdomain).
pub fn object_name() -> Rule {
    Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')")
        .message("must be the name of an object in this namespace: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit")
}

/// A key in a Secret's data.
pub fn secret_key() -> Rule {
    Rule::new("self.matches('^[-._a-zA-Z0-9]+$')")
        .message("must be a Secret data key: letters, digits, '-', '_' and '.'")
}

/// A Nix store path such as a NixOS system closure.
pub fn store_path() -> Rule {
    Rule::new(format!("self.matches('{STORE_PATH_PATTERN}')")).message(
        "must be a Nix store path: /nix/store/, 32 characters of Nix base32 (0-9, a-z without e, o, u, t), '-' and a name, \
         e.g. /nix/store/0c0wwg3s6d7dz6gmqp7dyn6gavz0xm8d-nixos-system-web-1-25.05",
    )
}

/// A host name or an IP address.
pub fn host() -> Rule {
    Rule::new("isIP(self) || self.matches('^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\\\\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*$')")
        .message("must be a DNS name or an IP address, e.g. web-1.example.org or 203.0.113.5")
}

/// An SSH public key in OpenSSH format: `<type> <base64> [comment]`.
pub fn ssh_public_key() -> Rule {
    Rule::new("self.matches('^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh.com) [A-Za-z0-9+/]+={0,3}( .*)?$')")
        .message("must be an OpenSSH public key, '<type> <base64> [comment]' with type ssh-ed25519, ssh-rsa or ecdsa-sha2-nistp256/384/521, e.g. the line from /etc/ssh/ssh_host_ed25519_key.pub")
}

/// A Unix user or group name.
pub fn unix_name() -> Rule {
    Rule::new("self.matches('^[a-z_][a-z0-9_-]*[$]?$')").message(
        "must be a Unix user or group name: lower-case letters, digits, '_' and '-', starting with a letter or '_'",
    )
}

/// An absolute path without `..` components.
pub fn absolute_path() -> Rule {
    Rule::new("self.startsWith('/') && !self.split('/').exists(c, c == '..')")
        .message("must be an absolute path (starting with '/') without '..' components, e.g. /run/keys")
}

/// A file name: no slashes, not `.` or `..`.
pub fn file_name() -> Rule {
    Rule::new("self.matches('^[A-Za-z0-9._-]+$') && self != '.' && self != '..'")
        .message("must be a file name: letters, digits, '.', '_' and '-', no '/'")
}

/// An octal file mode such as "0400" or "640".
pub fn file_mode() -> Rule {
    Rule::new("self.matches('^0?[0-7]{3}$')")
        .message("must be an octal file mode as a string, e.g. \"0400\" or \"0640\"")
}

/// A block device path.
pub fn device_path() -> Rule {
    Rule::new("self.matches('^/dev/[A-Za-z0-9][A-Za-z0-9/_.:-]*$') && !self.contains('..')")
        .message("must be a block device path under /dev, e.g. /dev/xvdf or /dev/disk/by-id/nvme-…")
}

/// An IPv4 CIDR block.
pub fn ipv4_cidr() -> Rule {
    Rule::new("isCIDR(self) && cidr(self).ip().family() == 4 && cidr(self) == cidr(self).masked()")
        .message("must be an IPv4 CIDR block with no host bits set, e.g. 10.0.0.0/16 or 0.0.0.0/0")
}

/// An AWS region name.
pub fn aws_region() -> Rule {
    Rule::new("self.matches('^[a-z]{2}(-[a-z]+)+-[0-9]+$')")
        .message("must be an AWS region name, e.g. eu-west-1 or us-gov-west-1")
}

/// An availability zone of an AWS region.
pub fn aws_zone() -> Rule {
    Rule::new("self.matches('^[a-z]{2}(-[a-z]+)+-[0-9]+[a-z]$')")
        .message("must be an availability zone name, e.g. eu-west-1a")
}

/// An HTTP(S) URL.
pub fn http_url() -> Rule {
    Rule::new("isURL(self) && (url(self).getScheme() == 'http' || url(self).getScheme() == 'https')")
        .message("must be an http:// or https:// URL, e.g. https://s3.eu-west-1.amazonaws.com")
}

/// A field that cannot change after creation. Only for fields every object
/// has (required or defaulted): the API server runs a rule on a field only
/// when both the old and the new object have it, so adding or removing an
/// optional field would pass; use [`fixed_at_creation`] for those.
pub fn immutable(what: &str) -> Rule {
    Rule::new("self == oldSelf").message(Message::Message(format!(
        "is immutable: {what} cannot change after creation; delete the object and create a new one"
    )))
}

/// An optional field that cannot be added, changed or removed after
/// creation. The rule goes on a struct every object has (the spec, or a
/// block whose presence is itself fixed), with `path` the field's path below
/// it, e.g. `provider.ec2.keyName`; the message names that field.
pub fn fixed_at_creation(path: &str, what: &str) -> Rule {
    // has() on every step, as `self.?a.?b == oldSelf.?a.?b` compares values
    // of unknown type, which the API server prices beyond its CEL budget.
    let steps: Vec<&str> = path.split('.').collect();
    let present = |root: &str| {
        (1..=steps.len()).map(|n| format!("has({root}.{})", steps[..n].join("."))).collect::<Vec<_>>().join(" && ")
    };
    let (new, old) = (present("self"), present("oldSelf"));
    Rule::new(format!("({new}) == ({old}) && (!({new}) || self.{path} == oldSelf.{path})"))
        .message(Message::Message(format!(
            "is immutable: {what} cannot be added, changed or removed after creation; delete the object and create a new one"
        )))
        .field_path(format!(".{path}"))
}

/// A list merged by server-side apply as a map keyed by `key`, so two
/// managers can own different entries and entries are unique by key.
pub fn list_map(key: &str) -> MergeStrategy {
    MergeStrategy::ListType(ListMerge::Map(vec![key.to_owned()]))
}
