//! Artifact uploads to S3 under deterministic keys, streamed from files.
//!
//! The key is `<prefix>/<organization_id>/<project_id>/<run_id>/<file name>`, so a retry
//! overwrites instead of duplicating. Bodies are read from disk part by part: a file
//! above the multipart threshold goes up in equal parts of `part_size_bytes` (R2 needs
//! equal parts), and memory stays flat whatever the file size.

use std::path::Path;

use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation, endpoint};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use futures_util::FutureExt;
use uuid::Uuid;

/// Files up to this size are sent from memory. Streamed from disk, each chunk of a file
/// is a hop to the blocking pool and back: for a typical run's few-KB logs those hops
/// cost the worker more CPU than the bytes. Read in one blocking step instead, a run's
/// artifacts in flight hold at most this much each.
pub const IN_MEMORY_MAX: u64 = 256 * 1024;

/// The file's size and, when it is at most [`IN_MEMORY_MAX`], its bytes: one blocking
/// step (open, size, read).
async fn read_if_small(
    path: std::path::PathBuf,
) -> Result<std::io::Result<(u64, Option<Vec<u8>>)>, tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(&path)?;
        let size = file.metadata()?.len();
        if size > IN_MEMORY_MAX {
            return Ok((size, None));
        }
        let mut bytes = Vec::with_capacity(size as usize);
        (&mut file)
            .take(IN_MEMORY_MAX + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > IN_MEMORY_MAX {
            // It grew since its size was read: stream it after all.
            return Ok((file.metadata()?.len(), None));
        }
        Ok((bytes.len() as u64, Some(bytes)))
    })
    .await
}

use crate::config::{ChecksumMode, S3Settings};
use crate::fault::{Dependency, Fault};

/// A failed upload or delete. Its fault is set where it is made: one that may pass
/// (5xx, SlowDown, timeouts, unreachable endpoint) is the S3 endpoint's, not the run's,
/// since every run uploads to the same bucket ([`sdk_fault`]); the rest (a local file
/// that cannot be read, access denied) cannot pass by retrying.
#[derive(Debug, thiserror::Error)]
#[error("S3 upload of {key} failed: {message}")]
pub struct UploadError {
    pub key: String,
    pub message: String,
    pub fault: Fault,
}

impl UploadError {
    pub fn fault(&self) -> Fault {
        self.fault.clone()
    }

    /// A failure of this side (the local file, the request built from it): permanent.
    fn local(key: &str, message: String) -> Self {
        Self {
            key: key.into(),
            message,
            fault: Fault::Permanent,
        }
    }
}

/// Builds an S3 client from the settings and the standard AWS credential chain.
pub async fn build_client(s: &S3Settings) -> aws_sdk_s3::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(s.region.clone()))
        .load()
        .await;
    let mut b = aws_sdk_s3::config::Builder::from(&shared).force_path_style(s.force_path_style);
    if let Some(endpoint) = &s.endpoint {
        b = b.endpoint_url(endpoint);
    }
    b = b.endpoint_resolver(CachedEndpoints::default());
    if s.checksum == ChecksumMode::WhenRequired {
        b = b
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    }
    aws_sdk_s3::Client::from_conf(b.build())
}

/// The SDK's endpoint rules, remembered per bucket and setting. The rules run for every
/// request (URL parsing, bucket-name checks with regular expressions, partition lookup):
/// a few percent of the worker's CPU per run, for the same answer each time, since
/// nothing they read changes between the requests of one client but the object key, and
/// the rules do not read the key.
#[derive(Debug)]
struct CachedEndpoints {
    rules: aws_sdk_s3::config::endpoint::DefaultResolver,
    known: std::sync::Mutex<Vec<(endpoint::Params, endpoint::Endpoint)>>,
}

/// Buckets remembered at most: the upload bucket and the source buckets a deployment
/// reads from are few; past this the rules simply run each time.
const CACHED_ENDPOINTS_MAX: usize = 16;

impl Default for CachedEndpoints {
    /// `DefaultResolver::new`, not its `Default`: that one has no partitions and
    /// resolves nothing.
    fn default() -> Self {
        Self {
            rules: endpoint::DefaultResolver::new(),
            known: std::sync::Mutex::default(),
        }
    }
}

impl CachedEndpoints {
    /// The parameters the rules read: all but the key, prefix and copy source, which
    /// differ on every request and are not used by them.
    fn scope(p: &endpoint::Params) -> Option<endpoint::Params> {
        endpoint::Params::builder()
            .set_bucket(p.bucket().map(Into::into))
            .set_region(p.region().map(Into::into))
            .set_use_fips(p.use_fips())
            .set_use_dual_stack(p.use_dual_stack())
            .set_endpoint(p.endpoint().map(Into::into))
            .set_force_path_style(p.force_path_style())
            .set_accelerate(p.accelerate())
            .set_use_global_endpoint(p.use_global_endpoint())
            .set_use_object_lambda_endpoint(p.use_object_lambda_endpoint())
            .set_disable_access_points(p.disable_access_points())
            .set_disable_multi_region_access_points(p.disable_multi_region_access_points())
            .set_use_arn_region(p.use_arn_region())
            .set_use_s3_express_control_endpoint(p.use_s3_express_control_endpoint())
            .set_disable_s3_express_session_auth(p.disable_s3_express_session_auth())
            .build()
            .ok()
    }
}

impl endpoint::ResolveEndpoint for CachedEndpoints {
    fn resolve_endpoint<'a>(
        &'a self,
        params: &'a endpoint::Params,
    ) -> endpoint::EndpointFuture<'a> {
        let Some(scope) = Self::scope(params) else {
            return endpoint::ResolveEndpoint::resolve_endpoint(&self.rules, params);
        };
        let lock = || self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, found)) = lock().iter().find(|(p, _)| *p == scope) {
            return endpoint::EndpointFuture::ready(Ok(found.clone()));
        }
        let resolved = endpoint::ResolveEndpoint::resolve_endpoint(&self.rules, &scope);
        let Some(Ok(found)) = resolved.now_or_never() else {
            return endpoint::ResolveEndpoint::resolve_endpoint(&self.rules, params);
        };
        let mut known = lock();
        if known.len() < CACHED_ENDPOINTS_MAX {
            known.push((scope, found.clone()));
        }
        endpoint::EndpointFuture::ready(Ok(found))
    }
}

/// Whose fault an SDK error is: throttling, 5xx, timeouts and connection failures say
/// the S3 endpoint is unavailable (it serves every run); a missing key or bucket, or
/// access denied, cannot pass by retrying.
pub fn sdk_fault<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Fault {
    let may_pass = match e {
        SdkError::ServiceError(se) => matches!(
            se.err().code().unwrap_or_default(),
            "SlowDown"
                | "InternalError"
                | "ServiceUnavailable"
                | "RequestTimeout"
                | "Throttling"
                | "ThrottlingException"
        ),
        SdkError::ResponseError(_) | SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            true
        }
        _ => false,
    };
    if may_pass {
        Fault::Dependency(Dependency::ArtifactStore)
    } else {
        Fault::Permanent
    }
}

/// The key or its bucket does not exist.
pub fn sdk_not_found<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    matches!(e, SdkError::ServiceError(se)
        if matches!(se.err().code(), Some("NoSuchKey" | "NoSuchBucket" | "NotFound")))
}

pub fn describe_sdk_error<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(
    e: &SdkError<E, R>,
) -> String {
    match e {
        SdkError::ServiceError(se) => format!(
            "{}: {}",
            se.err().code().unwrap_or("service error"),
            se.err().message().unwrap_or_default()
        ),
        SdkError::DispatchFailure(d) => format!("cannot reach S3: {d:?}"),
        SdkError::TimeoutError(_) => "request timed out".into(),
        other => format!("{other:?}"),
    }
}

/// The bucket and layout artifacts are stored with.
#[derive(Clone)]
pub struct ArtifactStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    multipart_threshold: u64,
    part_size: u64,
    checksum: ChecksumMode,
}

impl ArtifactStore {
    pub fn new(client: aws_sdk_s3::Client, s: &S3Settings, bucket: &str) -> Self {
        Self {
            client,
            bucket: bucket.to_string(),
            prefix: s.prefix.clone(),
            multipart_threshold: s.multipart_threshold_bytes,
            part_size: s.part_size_bytes,
            checksum: s.checksum,
        }
    }

    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The deterministic key of a run's artifact.
    pub fn key_for(
        &self,
        organization_id: Uuid,
        project_id: Uuid,
        run_id: Uuid,
        file_name: &str,
    ) -> String {
        Self::key_with_prefix(&self.prefix, organization_id, project_id, run_id, file_name)
    }

    /// `<prefix>/<organization_id>/<project_id>/<run_id>/<file name>`; shared with the
    /// runner side, which stages under another prefix.
    pub fn key_with_prefix(
        prefix: &str,
        organization_id: Uuid,
        project_id: Uuid,
        run_id: Uuid,
        file_name: &str,
    ) -> String {
        let tail = format!("{organization_id}/{project_id}/{run_id}/{file_name}");
        if prefix.is_empty() {
            tail
        } else {
            format!("{prefix}/{tail}")
        }
    }

    pub fn uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// Uploads a local file under `key`, streaming it; returns the bytes sent.
    pub async fn upload_file(
        &self,
        path: &Path,
        key: &str,
        content_type: &str,
    ) -> Result<u64, UploadError> {
        let local =
            |e: String| UploadError::local(key, format!("cannot read {}: {e}", path.display()));
        let (size, small) = read_if_small(path.to_path_buf())
            .await
            .map_err(|e| local(e.to_string()))?
            .map_err(|e| local(e.to_string()))?;
        let body = match small {
            Some(bytes) => ByteStream::from(bytes),
            None if size > self.multipart_threshold => {
                self.upload_multipart(path, size, key, content_type).await?;
                return Ok(size);
            }
            None => ByteStream::read_from()
                .path(path)
                .length(Length::Exact(size))
                .build()
                .await
                .map_err(|e| UploadError::local(key, e.to_string()))?,
        };
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .content_length(size as i64)
            .body(body)
            .send()
            .await
            .map_err(|e| self.sdk_error(key, &e))?;
        Ok(size)
    }

    /// Uploads bytes already in memory (small documents such as a corrupt summary).
    pub async fn upload_bytes(
        &self,
        bytes: Vec<u8>,
        key: &str,
        content_type: &str,
    ) -> Result<u64, UploadError> {
        let size = bytes.len() as u64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| self.sdk_error(key, &e))?;
        Ok(size)
    }

    /// Deletes one object; deleting a key that does not exist succeeds (as in S3).
    pub async fn delete(&self, key: &str) -> Result<(), UploadError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.sdk_error(key, &e))?;
        Ok(())
    }

    /// Deletes the objects one request each (a run has a handful, and plain
    /// DeleteObject is what every S3-compatible store implements). Tries every key and
    /// returns the failures.
    pub async fn delete_objects(&self, keys: &[String]) -> Vec<UploadError> {
        let mut failed = Vec::new();
        for key in keys {
            if let Err(e) = self.delete(key).await {
                failed.push(e);
            }
        }
        failed
    }

    /// The key of an `s3://<bucket>/<key>` URI of this store's bucket.
    pub fn key_of<'a>(&self, uri: &'a str) -> Option<&'a str> {
        uri.strip_prefix("s3://")?
            .strip_prefix(self.bucket.as_str())?
            .strip_prefix('/')
    }

    async fn upload_multipart(
        &self,
        path: &Path,
        size: u64,
        key: &str,
        content_type: &str,
    ) -> Result<(), UploadError> {
        let mut create = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type);
        if self.checksum == ChecksumMode::WhenSupported {
            create = create.checksum_algorithm(ChecksumAlgorithm::Crc32);
        }
        let created = create.send().await.map_err(|e| self.sdk_error(key, &e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| UploadError {
                key: key.into(),
                message: "no upload id in CreateMultipartUpload".into(),
                fault: Fault::Dependency(Dependency::ArtifactStore),
            })?
            .to_string();
        match self.upload_parts(path, size, key, &upload_id).await {
            Ok(parts) => {
                let done = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await;
                if let Err(e) = done {
                    self.abort(key, &upload_id).await;
                    return Err(self.sdk_error(key, &e));
                }
                Ok(())
            }
            Err(e) => {
                // Abort so the store does not keep (and bill for) orphaned parts.
                self.abort(key, &upload_id).await;
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        path: &Path,
        size: u64,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<CompletedPart>, UploadError> {
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut number = 1i32;
        while offset < size {
            let len = self.part_size.min(size - offset);
            let body = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(len))
                .build()
                .await
                .map_err(|e| UploadError::local(key, e.to_string()))?;
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(len as i64)
                .body(body)
                .send()
                .await
                .map_err(|e| self.sdk_error(key, &e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                    .build(),
            );
            offset += len;
            number += 1;
        }
        Ok(parts)
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        if let Err(e) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            tracing::warn!(s3.key = key, error = %describe_sdk_error(&e), "could not abort a failed multipart upload");
        }
    }

    fn sdk_error<E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(
        &self,
        key: &str,
        e: &SdkError<E, R>,
    ) -> UploadError {
        UploadError {
            key: key.into(),
            message: describe_sdk_error(e),
            fault: sdk_fault(e),
        }
    }
}

/// The content type stored with an artifact, from its role.
pub fn content_type_for(file_name: &str) -> &'static str {
    if file_name.ends_with(".gz") {
        "application/gzip"
    } else if file_name.ends_with(".json") {
        "application/json"
    } else if file_name.ends_with(".ndjson") {
        "application/x-ndjson"
    } else if file_name.ends_with(".html") || file_name.ends_with(".htm") {
        "text/html; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    }
}
