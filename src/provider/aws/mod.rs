//! Amazon Web Services: EC2 (VPC, instances, EBS volumes, key pairs) and S3.
//!
//! An account is named by a Network's `spec.provider.ec2`: region, optional
//! endpoint, and a credentials Secret (or the default credential chain).
//! Clients are cached per Network and rebuilt when its Secret changes.

pub mod ebs;
pub mod ec2;
pub mod keypair;
pub mod providers;
pub mod s3;
pub mod snapshot;
pub mod vpc;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_sdk_ec2::error::ProvideErrorMetadata;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::{Client, ResourceExt};

use super::ProviderError;
use crate::api::Network;
use crate::api::network::Ec2Network;
use crate::metrics::Metrics;

pub use crate::provider::tags;

/// EC2 and S3 clients for one account and region.
pub struct AwsClients {
    pub ec2: aws_sdk_ec2::Client,
    pub s3: aws_sdk_s3::Client,
    pub region: String,
    limits: Arc<RateLimits>,
    metrics: Metrics,
}

/// Client-side rate limits of one account and region, shared by every
/// Network that uses it: AWS throttles per account and region, and mutating
/// calls (RunInstances, CreateVolume, …) far more than Describe calls.
pub struct RateLimits {
    reads: governor::DefaultDirectRateLimiter,
    writes: governor::DefaultDirectRateLimiter,
}

impl RateLimits {
    fn new() -> Self {
        use governor::{Quota, RateLimiter};
        use std::num::NonZeroU32;
        let quota = |per_second: u32, burst: u32| {
            Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
        };
        Self { reads: RateLimiter::direct(quota(20, 40)), writes: RateLimiter::direct(quota(5, 10)) }
    }
}

impl AwsClients {
    /// Waits for a slot for a read-only call (Describe*, Get*, Head*, List*):
    /// `aws.reading().await.ec2.describe_vpcs()…`.
    pub async fn reading(&self) -> &Self {
        self.limits.reads.until_ready().await;
        self
    }

    /// Waits for a slot for a mutating call: `aws.writing().await.ec2.run_instances()…`.
    pub async fn writing(&self) -> &Self {
        self.limits.writes.until_ready().await;
        self
    }

    /// Sends one API call, the only way this module talks to AWS: it is
    /// counted in `nixops_provider_calls_total` (provider `aws`, the API
    /// operation, ok or error) and its error classified once (see
    /// [`classify`]), keeping the AWS error code for callers to which a code
    /// means success (NotFound on delete, Duplicate on authorize).
    /// `doing` is what the message says was being done.
    pub async fn call<T, E>(
        &self,
        operation: &'static str,
        doing: impl std::fmt::Display,
        request: impl std::future::Future<Output = Result<T, aws_sdk_ec2::error::SdkError<E>>>,
    ) -> Result<T, AwsError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let result = request.await;
        self.metrics.provider_call("aws", operation, result.is_ok());
        result.map_err(|err| {
            let code = error_code(&err).map(str::to_owned);
            let status = err.raw_response().map(|r| r.status().as_u16());
            let doing = doing.to_string();
            let doing = if doing.starts_with(operation) { doing } else { format!("{operation} {doing}") };
            AwsError { code, status, error: classify(err, doing.trim_end()) }
        })
    }
}

/// A failed AWS call: classified, with the AWS error code and HTTP status.
#[derive(Debug)]
pub struct AwsError {
    code: Option<String>,
    status: Option<u16>,
    error: ProviderError,
}

impl AwsError {
    /// Whether AWS answered with error code `code`.
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }

    /// Whether the code says the resource does not exist (`InvalidVpcID.NotFound`,
    /// `InvalidGroup.NotFound`, …).
    pub fn is_not_found(&self) -> bool {
        self.code.as_deref().is_some_and(|c| c.ends_with(".NotFound") || c == "NotFound")
    }

    /// For a call naming a resource created moments ago: NotFound is the
    /// cloud's reads lagging its writes, retried rather than stalled.
    pub fn retry_not_found(self) -> ProviderError {
        if self.is_not_found() { self.refused() } else { self.error }
    }

    /// The answer says the call did nothing and a retry may succeed.
    pub fn refused(self) -> ProviderError {
        ProviderError::Refused(self.error.to_string())
    }

    /// The error with `why` added to its message.
    pub fn context(self, why: &str) -> ProviderError {
        match self.error {
            ProviderError::Transient(m) => ProviderError::Transient(format!("{m} ({why})")),
            ProviderError::Refused(m) => ProviderError::Refused(format!("{m} ({why})")),
            ProviderError::Permanent { reason, message } => {
                ProviderError::Permanent { reason, message: format!("{message} ({why})") }
            }
        }
    }

    /// The HTTP status of the answer (S3 answers HEAD with a bare status).
    pub fn http_status(&self) -> Option<u16> {
        self.status
    }
}

impl From<AwsError> for ProviderError {
    fn from(err: AwsError) -> Self {
        err.error
    }
}

/// Builds and caches clients per Network.
#[derive(Clone)]
pub struct AwsAccounts {
    client: Client,
    metrics: Metrics,
    cache: Arc<Mutex<HashMap<String, CachedClients>>>,
    /// Rate limits by account (access key or "default chain"), region and endpoint.
    limits: Arc<Mutex<HashMap<String, Arc<RateLimits>>>>,
}

/// Clients with the version of the settings they were built from.
type CachedClients = (String, Arc<AwsClients>);

impl AwsAccounts {
    /// Accounts whose calls are counted in `metrics`.
    pub fn new(client: Client, metrics: Metrics) -> Self {
        Self { client, metrics, cache: Arc::default(), limits: Arc::default() }
    }

    /// The clients for `network`'s account; a Stalled-worthy error names the
    /// field to fix.
    pub async fn for_network(&self, network: &Network) -> Result<Arc<AwsClients>, ProviderError> {
        let name = network.name_any();
        let ns = network.namespace().unwrap_or_default();
        let ec2 = network.spec.provider.as_ref().and_then(|p| p.ec2.as_ref()).ok_or_else(|| {
            ProviderError::permanent(
                "NotAnAwsNetwork",
                format!("Network {name} has no spec.provider.ec2, so it names no AWS account; reference a Network with spec.provider.ec2"),
            )
        })?;
        let secret = match &ec2.credentials_secret_ref {
            Some(r) => Some(Api::<Secret>::namespaced(self.client.clone(), &ns).get_opt(&r.name).await.map_err(|e| ProviderError::Transient(e.to_string()))?.ok_or_else(|| {
                ProviderError::permanent(
                    "CredentialsNotFound",
                    format!("Secret {} named by Network {name} spec.provider.ec2.credentialsSecretRef does not exist; create it with keys accessKeyId and secretAccessKey", r.name),
                )
            })?),
            None => None,
        };
        let key = format!("{ns}/{name}");
        let version = format!(
            "{}|{}|{:?}",
            secret.as_ref().and_then(|s| s.resource_version()).unwrap_or_default(),
            ec2.region,
            ec2.endpoint
        );
        if let Some((v, clients)) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
            && *v == version
        {
            return Ok(clients.clone());
        }
        let account =
            secret.as_ref().and_then(|s| secret_value(s, "accessKeyId")).unwrap_or_else(|| "default-chain".into());
        let limits = self
            .limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(format!("{account}|{}|{:?}", ec2.region, ec2.endpoint))
            .or_insert_with(|| Arc::new(RateLimits::new()))
            .clone();
        let clients = Arc::new(build(ec2, secret.as_ref(), &name, limits, self.metrics.clone()).await?);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, (version, clients.clone()));
        Ok(clients)
    }
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    let data = secret.data.as_ref()?.get(key)?;
    String::from_utf8(data.0.clone()).ok().map(|s| s.trim().to_owned())
}

async fn build(
    ec2: &Ec2Network,
    secret: Option<&Secret>,
    network: &str,
    limits: Arc<RateLimits>,
    metrics: Metrics,
) -> Result<AwsClients, ProviderError> {
    let region = aws_config::Region::new(ec2.region.clone());
    // Adaptive retries back off on throttling (RequestLimitExceeded, SlowDown)
    // with a client-side token bucket, on top of the controllers' own backoff.
    let retry = aws_config::retry::RetryConfig::adaptive().with_max_attempts(4);
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).region(region).retry_config(retry);
    let mut endpoint = ec2.endpoint.clone();
    if let Some(secret) = secret {
        let name = secret.name_any();
        let missing = |key: &str| {
            ProviderError::permanent(
                "CredentialsIncomplete",
                format!("Secret {name} (credentials of Network {network}) has no key {key}; add it"),
            )
        };
        let access = secret_value(secret, "accessKeyId").ok_or_else(|| missing("accessKeyId"))?;
        let secret_key = secret_value(secret, "secretAccessKey").ok_or_else(|| missing("secretAccessKey"))?;
        let token = secret_value(secret, "sessionToken");
        loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
            access,
            secret_key,
            token,
            None,
            "nixops-secret",
        ));
        endpoint = endpoint.or_else(|| secret_value(secret, "endpoint"));
    }
    if let Some(url) = &endpoint {
        loader = loader.endpoint_url(url);
    }
    let config = loader.load().await;
    let s3_config = aws_sdk_s3::config::Builder::from(&config).force_path_style(endpoint.is_some()).build();
    Ok(AwsClients {
        ec2: aws_sdk_ec2::Client::new(&config),
        s3: aws_sdk_s3::Client::from_conf(s3_config),
        region: ec2.region.clone(),
        limits,
        metrics,
    })
}

/// Config for calls that create something and are not idempotent on every
/// endpoint (RunInstances, CreateVolume, CreateVpc, …): the SDK must not
/// retry them by itself, since an endpoint that ignores ClientToken would
/// create a second resource when a response was lost. The controller
/// retries instead, after looking the resource up by its UID tag.
pub fn single_attempt() -> aws_sdk_ec2::config::Builder {
    aws_sdk_ec2::config::Builder::new().retry_config(aws_config::retry::RetryConfig::disabled())
}

/// Classifies an AWS SDK error: throttling and transport trouble are retried,
/// everything that needs a change (bad input, auth, quotas) stalls. The
/// message carries the AWS error code and what was being done.
fn classify<E, R>(err: aws_sdk_ec2::error::SdkError<E, R>, doing: &str) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_ec2::error::SdkError;
    match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("Unknown").to_owned();
            let message = format!("{doing}: AWS {code}: {}", e.message().unwrap_or("no message"));
            if is_transient_code(&code) {
                // A server error leaves a create's outcome unknown; any other
                // answer says it was not done.
                if is_server_error_code(&code) {
                    ProviderError::Transient(message)
                } else {
                    ProviderError::Refused(message)
                }
            } else {
                ProviderError::permanent("AwsError", message)
            }
        }
        _ => ProviderError::Transient(format!("{doing}: {}", aws_sdk_ec2::error::DisplayErrorContext(&err))),
    }
}

/// AWS error codes of a server that failed while handling the request.
fn is_server_error_code(code: &str) -> bool {
    matches!(
        code,
        "InternalError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "Unavailable"
            | "RequestTimeout"
            | "RequestTimeoutException"
    )
}

/// AWS error codes worth retrying.
pub fn is_transient_code(code: &str) -> bool {
    matches!(
        code,
        "RequestLimitExceeded"
            | "Throttling"
            | "ThrottlingException"
            | "SlowDown"
            | "InternalError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "Unavailable"
            | "RequestTimeout"
            | "RequestTimeoutException"
            | "IncorrectState"
            | "IncorrectInstanceState"
            | "VolumeInUse"
            | "DependencyViolation"
            | "OperationAborted"
    )
}

/// The error code of an SDK error, if the service answered.
fn error_code<E: ProvideErrorMetadata, R>(err: &aws_sdk_ec2::error::SdkError<E, R>) -> Option<&str> {
    match err {
        aws_sdk_ec2::error::SdkError::ServiceError(s) => s.err().code(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutating_calls_get_a_smaller_budget_than_reads() {
        let limits = RateLimits::new();
        let writes = (0..100).take_while(|_| limits.writes.check().is_ok()).count();
        let reads = (0..100).take_while(|_| limits.reads.check().is_ok()).count();
        assert_eq!(writes, 10, "burst of mutating calls");
        assert_eq!(reads, 40, "burst of read calls");
    }

    #[test]
    fn not_found_right_after_a_create_is_retried() {
        let not_found = |code: &str| AwsError {
            code: Some(code.into()),
            status: Some(400),
            error: ProviderError::permanent("AwsError", format!("AWS {code}")),
        };
        assert!(matches!(not_found("InvalidSubnetID.NotFound").retry_not_found(), ProviderError::Refused(_)));
        assert!(matches!(not_found("InvalidVpcID.NotFound").retry_not_found(), ProviderError::Refused(_)));
        assert!(
            matches!(not_found("InvalidParameterValue").retry_not_found(), ProviderError::Permanent { .. }),
            "other errors keep their class"
        );
    }

    #[test]
    fn throttling_is_retried_and_bad_input_is_not() {
        assert!(is_transient_code("RequestLimitExceeded"));
        assert!(is_transient_code("DependencyViolation"));
        assert!(!is_transient_code("InvalidAMIID.NotFound"));
        assert!(!is_transient_code("AuthFailure"));
        assert!(!is_transient_code("InstanceLimitExceeded"), "a quota needs a human");
    }
}
