//! Fetching a run's artifacts: local files (under allowed roots only), HTTP(S) (to
//! allow-listed hosts only) and S3, with size limits, timeouts and a cap on how far a
//! gzip-compressed summary may inflate.
//!
//! Large artifacts are never held in memory: a local file is used where it lies, and
//! anything remote is streamed into a temporary file first.
//!
//! `s3://` sources are tenant-scoped and every URI is shown redacted (`artifact/source.rs`).

mod source;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use url::Url;

use crate::config::FetchSettings;
use crate::fault::{Dependency, Fault};
pub use source::{REDACTED, S3Scope, S3Sources, Tenant, redact_uri};

/// Why an artifact could not be fetched; [`FetchError::fault`] decides retry or dead-letter.
///
/// Every `uri` field holds the URI as [`redact_uri`] shows it, never the raw one: these
/// errors end up in logs, dead-letter reasons and `runs.error_details`.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("artifact {uri} refused: {reason}")]
    Refused { uri: String, reason: String },
    #[error("artifact {uri} not found")]
    NotFound { uri: String },
    #[error("artifact {uri} is larger than the limit of {limit} bytes")]
    TooLarge { uri: String, limit: u64 },
    #[error("artifact {uri}: HTTP status {status}")]
    Status { uri: String, status: u16 },
    #[error("artifact {uri}: timed out after {secs} s")]
    Timeout { uri: String, secs: u64 },
    #[error("artifact {uri}: {message}")]
    Transport { uri: String, message: String },
    #[error("artifact {uri}: corrupt gzip data: {message}")]
    Corrupt { uri: String, message: String },
    #[error("artifact {uri}: local I/O error: {source}")]
    Io {
        uri: String,
        #[source]
        source: std::io::Error,
    },
    #[error("artifact {uri}: S3 error: {message}")]
    S3 {
        uri: String,
        message: String,
        /// Set where the error is made ([`crate::s3::sdk_fault`]).
        fault: Fault,
    },
}

impl FetchError {
    /// Whose fault this is. A host that answered with a status is up, so a 5xx, 429 or
    /// 408 is the message's transient fault; a timeout or a broken connection to an
    /// HTTP(S) host says the host may be down; an S3 fault that may pass is the worker's
    /// S3 endpoint being unavailable (s3:// artifacts come from it).
    pub fn fault(&self) -> Fault {
        match self {
            Self::Status { status, .. } if *status >= 500 || *status == 429 || *status == 408 => {
                Fault::Transient
            }
            Self::Timeout { uri, .. } | Self::Transport { uri, .. } => {
                Dependency::host_of(uri).map_or(Fault::Transient, Fault::Dependency)
            }
            Self::Io { .. } => Fault::Transient,
            Self::S3 { fault, .. } => fault.clone(),
            Self::Status { .. }
            | Self::Refused { .. }
            | Self::NotFound { .. }
            | Self::TooLarge { .. }
            | Self::Corrupt { .. } => Fault::Permanent,
        }
    }
}

/// Where an artifact URI points, after the allow-lists were checked.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    /// May carry basic-auth credentials (sent as an `Authorization` header, never shown).
    Http(Url),
    S3 {
        bucket: String,
        key: String,
    },
}

/// By hand, so that a logged `Source` shows an HTTP URL's credentials redacted.
impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Http(url) => f
                .debug_tuple("Http")
                .field(&redact_uri(url.as_str()))
                .finish(),
            Self::S3 { bucket, key } => f
                .debug_struct("S3")
                .field("bucket", bucket)
                .field("key", key)
                .finish(),
        }
    }
}

impl Source {
    /// The artifact's file name, for its S3 key.
    pub fn file_name(&self) -> String {
        let raw = match self {
            Self::File(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Self::Http(u) => u
                .path_segments()
                .and_then(|mut s| s.next_back())
                .unwrap_or_default()
                .to_string(),
            Self::S3 { key, .. } => key.rsplit('/').next().unwrap_or_default().to_string(),
        };
        safe_file_name(&raw)
    }
}

/// A file name made of ASCII letters, digits, `.`, `-` and `_` only, without leading dots:
/// safe as the last segment of an S3 key and in an `s3://` URI without encoding.
pub fn safe_file_name(raw: &str) -> String {
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    clean.trim_start_matches('.').to_string()
}

/// Resolves a URI from a message of `tenant` against the allow-lists, before anything is
/// read: `s3://` only under `tenant`'s prefixes in `s3_sources`, `http(s)://` only to
/// `hosts`, local paths only under `roots`.
///
/// `base_dir` is the message file's directory during replay: relative paths resolve
/// against it and must stay inside it. Without it relative paths are refused.
pub fn resolve(
    uri: &str,
    base_dir: Option<&Path>,
    roots: &[PathBuf],
    hosts: &[String],
    s3_sources: &S3Sources,
    tenant: &Tenant,
) -> Result<Source, FetchError> {
    let shown = redact_uri(uri);
    let refused = |reason: &str| FetchError::Refused {
        uri: shown.clone(),
        reason: reason.to_string(),
    };
    if uri.trim().is_empty() {
        return Err(refused("empty URI"));
    }
    match Url::parse(uri) {
        Ok(url) => match url.scheme() {
            // Parsed by hand: the URL parser normalises `..` and `%2e` segments away
            // before they could be refused.
            "s3" => match s3_sources.admit(uri, tenant) {
                Ok((bucket, key)) => Ok(Source::S3 { bucket, key }),
                Err(reason) => Err(refused(&reason)),
            },
            "http" | "https" => {
                let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
                // `port()` is None for a scheme's default port, even when written out.
                let with_port = url.port_or_known_default().map(|p| format!("{host}:{p}"));
                let allowed = hosts.iter().any(|h| {
                    let h = h.to_ascii_lowercase();
                    h == host || Some(&h) == with_port.as_ref()
                });
                if allowed {
                    Ok(Source::Http(url))
                } else {
                    Err(refused(&format!(
                        "host {host:?} is not in fetch.allowed_hosts"
                    )))
                }
            }
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| refused("file URI is not a local absolute path"))?;
                under_roots(&shown, &path, roots)
            }
            other => Err(refused(&format!(
                "unsupported scheme {other:?} (use s3, https, http or file)"
            ))),
        },
        Err(_) => {
            let path = Path::new(uri);
            if path.is_absolute() {
                return under_roots(&shown, path, roots);
            }
            let Some(base) = base_dir else {
                return Err(refused(
                    "relative paths are only accepted when replaying message files",
                ));
            };
            under_roots(&shown, &base.join(path), &[base.to_path_buf()])
        }
    }
}

/// A local path is accepted only if, with symlinks and `..` resolved, it lies under
/// one of the roots.
fn under_roots(uri: &str, path: &Path, roots: &[PathBuf]) -> Result<Source, FetchError> {
    let real = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Still refuse paths outside the roots before saying "not found".
            let lexical_ok = roots.iter().any(|r| lexically_under(path, r));
            return Err(if lexical_ok {
                FetchError::NotFound {
                    uri: uri.to_string(),
                }
            } else {
                FetchError::Refused {
                    uri: uri.to_string(),
                    reason: "path is outside fetch.allowed_roots".into(),
                }
            });
        }
        Err(e) => {
            return Err(FetchError::Io {
                uri: uri.to_string(),
                source: e,
            });
        }
    };
    // `real` has no symlink, `.` or `..` in it, so a root it starts with as written is
    // a real directory already: only a root written through a link or with `..` needs
    // resolving (a walk of stats per root, per artifact, avoided in the common case).
    let ok = roots.iter().any(|r| real.starts_with(r))
        || roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .any(|r| real.starts_with(&r));
    if ok {
        Ok(Source::File(real))
    } else {
        Err(FetchError::Refused {
            uri: uri.to_string(),
            reason: "path is outside fetch.allowed_roots".into(),
        })
    }
}

fn lexically_under(path: &Path, root: &Path) -> bool {
    use std::path::Component;
    let mut parts: Vec<Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                parts.pop();
            }
            Component::CurDir => {}
            c => parts.push(c),
        }
    }
    let normal: PathBuf = parts.iter().collect();
    normal.starts_with(root)
}

/// An artifact available as a local file: the original (for file sources) or a
/// temporary copy that is deleted when this value is dropped.
#[derive(Debug)]
pub struct LocalArtifact {
    pub path: PathBuf,
    pub size: u64,
    _temp: Option<tempfile::TempPath>,
}

/// Fetches artifacts within the configured limits.
#[derive(Clone)]
pub struct Fetcher {
    http: reqwest::Client,
    s3: Option<aws_sdk_s3::Client>,
    settings: FetchSettings,
    extra_roots: Vec<PathBuf>,
    s3_sources: S3Sources,
}

impl Fetcher {
    pub fn new(settings: &FetchSettings, s3: Option<aws_sdk_s3::Client>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(settings.connect_timeout_secs))
            // An idle timeout, not a total one: a large artifact that keeps arriving
            // must not be cut off, while a stalled server still times out.
            .read_timeout(Duration::from_secs(settings.timeout_secs))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            s3,
            settings: settings.clone(),
            extra_roots: Vec::new(),
            s3_sources: S3Sources::default(),
        })
    }

    /// Adds directories local paths may point into (the paths given to `replay`).
    pub fn with_roots(mut self, roots: Vec<PathBuf>) -> Self {
        self.extra_roots = roots;
        self
    }

    /// Where `s3://` sources may lie (`s3.source_templates`); without this call none may.
    pub fn with_s3_sources(mut self, sources: S3Sources) -> Self {
        self.s3_sources = sources;
        self
    }

    pub fn settings(&self) -> &FetchSettings {
        &self.settings
    }

    /// Resolves a URI from a message of `tenant`; see [`resolve`].
    pub fn resolve(
        &self,
        uri: &str,
        base_dir: Option<&Path>,
        tenant: &Tenant,
    ) -> Result<Source, FetchError> {
        let mut roots = self.settings.allowed_roots.clone();
        roots.extend(self.extra_roots.iter().cloned());
        resolve(
            uri,
            base_dir,
            &roots,
            &self.settings.allowed_hosts,
            &self.s3_sources,
            tenant,
        )
    }

    /// The summary's bytes, gunzipped if they were gzip-compressed.
    pub async fn fetch_summary(&self, uri: &str, source: &Source) -> Result<Vec<u8>, FetchError> {
        let uri = &redact_uri(uri);
        let limit = self.settings.max_summary_bytes;
        let local = self.fetch_to_local(uri, source, limit).await?;
        // A small plain summary (k6 writes it uncompressed) is read where the run is:
        // cheaper than a hop to the blocking pool. A gzip one, which may inflate to the
        // cap, and anything that cannot be read here go through the pool.
        let in_place = SUMMARY_IN_PLACE_MAX.min(limit);
        if local.size <= in_place
            && let Some(bytes) = read_small(&local.path, in_place)
            && !is_gzip(&bytes)
        {
            return Ok(bytes);
        }
        let inflate_cap = self.settings.max_inflated_bytes;
        let path = local.path.clone();
        let uri_owned = uri.to_string();
        tokio::task::spawn_blocking(move || read_maybe_gzip(&uri_owned, &path, limit, inflate_cap))
            .await
            .map_err(|e| FetchError::Transport {
                uri: uri.to_string(),
                message: format!("reader task failed: {e}"),
            })?
    }

    /// The artifact as a local file, copied into a temporary file when remote.
    pub async fn fetch_to_local(
        &self,
        uri: &str,
        source: &Source,
        limit: u64,
    ) -> Result<LocalArtifact, FetchError> {
        // `uri` only names the artifact in errors; the source is what is fetched.
        let uri = &redact_uri(uri);
        match source {
            Source::File(path) => {
                // One stat of a path `resolve` has just canonicalised (itself a walk of
                // stats on this thread): cheaper here than a hop to the blocking pool.
                let meta = std::fs::metadata(path).map_err(|e| io_error(uri, e))?;
                if !meta.is_file() {
                    return Err(FetchError::Refused {
                        uri: uri.into(),
                        reason: "not a regular file".into(),
                    });
                }
                if meta.len() > limit {
                    return Err(FetchError::TooLarge {
                        uri: uri.into(),
                        limit,
                    });
                }
                Ok(LocalArtifact {
                    path: path.clone(),
                    size: meta.len(),
                    _temp: None,
                })
            }
            Source::Http(url) => self.fetch_http(uri, url, limit).await,
            Source::S3 { bucket, key } => self.fetch_s3(uri, bucket, key, limit).await,
        }
    }

    async fn fetch_http(
        &self,
        uri: &str,
        url: &Url,
        limit: u64,
    ) -> Result<LocalArtifact, FetchError> {
        let secs = self.settings.timeout_secs;
        let map = |e: reqwest::Error| {
            if e.is_timeout() {
                FetchError::Timeout {
                    uri: uri.into(),
                    secs,
                }
            } else {
                FetchError::Transport {
                    uri: uri.into(),
                    message: error_chain(&e.without_url()),
                }
            }
        };
        let resp = self.http.get(url.clone()).send().await.map_err(map)?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Err(FetchError::NotFound { uri: uri.into() });
        }
        if !status.is_success() {
            return Err(FetchError::Status {
                uri: uri.into(),
                status: status.as_u16(),
            });
        }
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(FetchError::TooLarge {
                uri: uri.into(),
                limit,
            });
        }
        let (mut file, temp) = temp_file(uri).await?;
        let mut size = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(map)?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(FetchError::TooLarge {
                    uri: uri.into(),
                    limit,
                });
            }
            file.write_all(&chunk).await.map_err(|e| io_error(uri, e))?;
        }
        file.flush().await.map_err(|e| io_error(uri, e))?;
        Ok(LocalArtifact {
            path: temp.to_path_buf(),
            size,
            _temp: Some(temp),
        })
    }

    async fn fetch_s3(
        &self,
        uri: &str,
        bucket: &str,
        key: &str,
        limit: u64,
    ) -> Result<LocalArtifact, FetchError> {
        let Some(client) = &self.s3 else {
            return Err(FetchError::Refused {
                uri: uri.into(),
                reason: "no S3 client configured (set s3.* settings)".into(),
            });
        };
        let out = client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                if crate::s3::sdk_not_found(&e) {
                    FetchError::NotFound { uri: uri.into() }
                } else {
                    FetchError::S3 {
                        uri: uri.into(),
                        message: crate::s3::describe_sdk_error(&e),
                        fault: crate::s3::sdk_fault(&e),
                    }
                }
            })?;
        if out.content_length().is_some_and(|n| n as u64 > limit) {
            return Err(FetchError::TooLarge {
                uri: uri.into(),
                limit,
            });
        }
        let (mut file, temp) = temp_file(uri).await?;
        let mut body = out.body;
        let mut size = 0u64;
        while let Some(chunk) = body.try_next().await.map_err(|e| FetchError::S3 {
            uri: uri.into(),
            message: e.to_string(),
            fault: Fault::Dependency(Dependency::ArtifactStore),
        })? {
            size += chunk.len() as u64;
            if size > limit {
                return Err(FetchError::TooLarge {
                    uri: uri.into(),
                    limit,
                });
            }
            file.write_all(&chunk).await.map_err(|e| io_error(uri, e))?;
        }
        file.flush().await.map_err(|e| io_error(uri, e))?;
        Ok(LocalArtifact {
            path: temp.to_path_buf(),
            size,
            _temp: Some(temp),
        })
    }
}

/// An error and its causes on one line. reqwest's own text names the URL, query and all,
/// so callers pass the error `without_url()`: the artifact's redacted URI is shown beside it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn io_error(uri: &str, e: std::io::Error) -> FetchError {
    if e.kind() == std::io::ErrorKind::NotFound {
        FetchError::NotFound { uri: uri.into() }
    } else {
        FetchError::Io {
            uri: uri.into(),
            source: e,
        }
    }
}

async fn temp_file(uri: &str) -> Result<(tokio::fs::File, tempfile::TempPath), FetchError> {
    let temp = tempfile::Builder::new()
        .prefix("k6-ingest-")
        .tempfile()
        .map_err(|e| io_error(uri, e))?
        .into_temp_path();
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&temp)
        .await
        .map_err(|e| io_error(uri, e))?;
    Ok((file, temp))
}

/// Reads a file whole, inflating gzip (detected by its magic bytes) up to `inflate_cap`.
///
/// The bytes land in one buffer sized from what the file says it holds (its length, or
/// the gzip trailer's inflated size) and grown at most to `inflate_cap + 1`: a lying
/// trailer costs a few regrowths, never a doubling past the cap. A gzip file is inflated
/// straight from disk, so its compressed bytes are never held beside the inflated ones.
pub fn read_maybe_gzip(
    uri: &str,
    path: &Path,
    limit: u64,
    inflate_cap: u64,
) -> Result<Vec<u8>, FetchError> {
    use std::io::{Seek, SeekFrom};
    let too_large = |limit| FetchError::TooLarge {
        uri: uri.into(),
        limit,
    };
    let mut file = std::fs::File::open(path).map_err(|e| io_error(uri, e))?;
    let size = file.metadata().map_err(|e| io_error(uri, e))?.len();
    if size > limit {
        return Err(too_large(limit));
    }
    let mut magic = [0u8; 2];
    let n = read_full(&mut file, &mut magic).map_err(|e| io_error(uri, e))?;
    let gzip = n == 2 && is_gzip(&magic);
    let hint = if gzip && size >= 18 {
        let mut trailer = [0u8; 4];
        file.seek(SeekFrom::End(-4))
            .and_then(|_| file.read_exact(&mut trailer))
            .map_err(|e| io_error(uri, e))?;
        u64::from(u32::from_le_bytes(trailer))
    } else {
        size
    };
    file.seek(SeekFrom::Start(0))
        .map_err(|e| io_error(uri, e))?;
    // `take` also bounds a local file that grows while it is read.
    let file = file.take(limit + 1);
    let (read, cap) = if gzip {
        let decoder = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file));
        (read_capped(decoder, inflate_cap, hint), inflate_cap)
    } else {
        (read_capped(file, limit, hint), limit)
    };
    match read {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(too_large(cap)),
        Err(e) if gzip && e.kind() != std::io::ErrorKind::NotFound => Err(FetchError::Corrupt {
            uri: uri.into(),
            message: e.to_string(),
        }),
        Err(e) => Err(io_error(uri, e)),
    }
}

/// Reads as much as `buf` holds, fewer bytes only at the end of the file.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads `r` to its end into one buffer of at most `cap + 1` bytes; `None` when there is
/// more than `cap`. The buffer starts at `hint` and grows by doubling, clamped to the cap.
fn read_capped(mut r: impl Read, cap: u64, hint: u64) -> std::io::Result<Option<Vec<u8>>> {
    let cap1 = usize::try_from(cap.saturating_add(1)).unwrap_or(usize::MAX);
    let start = usize::try_from(hint.saturating_add(1))
        .unwrap_or(usize::MAX)
        .max(64 * 1024)
        .min(cap1);
    let mut out: Vec<u8> = Vec::with_capacity(start);
    loop {
        let room = out.capacity() - out.len();
        // `take` stops exactly at the capacity, so `read_to_end` never reallocates.
        let n = (&mut r).take(room as u64).read_to_end(&mut out)?;
        if out.len() >= cap1 {
            return Ok(None);
        }
        if n < room {
            return Ok(Some(out));
        }
        let grown = out.capacity().saturating_mul(2).min(cap1);
        out.reserve_exact(grown - out.len());
    }
}

pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// Opens a local file for line reading, transparently gunzipping it, without a cap on
/// the inflated size (tools and benchmarks; ingestion uses [`open_lines_capped`]).
pub fn open_lines(path: &Path) -> std::io::Result<Box<dyn std::io::BufRead + Send>> {
    open_lines_capped(path, u64::MAX)
}

/// Opens a local file for line reading, transparently gunzipping it; reading fails with
/// [`InflatedTooLarge`] once more than `max_bytes` (inflated) came out, so a gzip bomb
/// costs at most that much reading, never memory.
pub fn open_lines_capped(
    path: &Path,
    max_bytes: u64,
) -> std::io::Result<Box<dyn std::io::BufRead + Send>> {
    let mut file = std::fs::File::open(path)?;
    let mut magic = [0u8; 2];
    let n = read_full(&mut file, &mut magic)?;
    drop(file);
    let file = std::fs::File::open(path)?;
    let inner: Box<dyn Read + Send> = if n == 2 && is_gzip(&magic) {
        Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
            file,
        )))
    } else {
        Box::new(file)
    };
    Ok(capped_lines(inner, max_bytes, 256 * 1024))
}

/// [`open_lines_capped`] over a file already read into memory (a small one, read once
/// for both its samples and its upload).
pub fn lines_capped(bytes: &[u8], max_bytes: u64) -> Box<dyn std::io::BufRead + Send + '_> {
    let inner: Box<dyn Read + Send + '_> = if is_gzip(bytes) {
        Box::new(flate2::bufread::MultiGzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    capped_lines(inner, max_bytes, 64 * 1024)
}

fn capped_lines<'a>(
    inner: Box<dyn Read + Send + 'a>,
    max_bytes: u64,
    buffer: usize,
) -> Box<dyn std::io::BufRead + Send + 'a> {
    Box::new(std::io::BufReader::with_capacity(
        buffer,
        CappedRead {
            inner,
            left: max_bytes,
            cap: max_bytes,
        },
    ))
}

/// A local file's bytes when it holds at most `max` (`None` when it is larger, or
/// cannot be read: whoever needs it then reads it again and reports why).
pub fn read_small(path: &Path, max: u64) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(max + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    (bytes.len() as u64 <= max).then_some(bytes)
}

/// A summary up to this size is read without a hop to the blocking pool.
const SUMMARY_IN_PLACE_MAX: u64 = 64 * 1024;

/// The error a capped reader returns once its cap is passed.
#[derive(Debug, thiserror::Error)]
#[error("more than {cap} bytes once inflated (fetch.max_samples_inflated_bytes)")]
pub struct InflatedTooLarge {
    pub cap: u64,
}

/// A reader that fails, rather than ends, past `cap` bytes: a truncated file must never
/// pass for a complete one.
struct CappedRead<R> {
    inner: R,
    left: u64,
    cap: u64,
}

impl<R: Read> Read for CappedRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // One byte more tells a file of exactly `cap` bytes from a longer one.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(InflatedTooLarge { cap: self.cap })),
            };
        }
        let want = (buf.len() as u64).min(self.left) as usize;
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("a.json"), b"{}").unwrap();
        let roots = vec![root.clone()];
        let hosts = vec![
            "artifacts.internal".to_string(),
            "127.0.0.1:9000".to_string(),
        ];
        let sources = S3Sources::new(
            &["s3://{bucket}/staging/{organization_id}/{project_id}/".to_string()],
            Some("bkt"),
            "",
        )
        .unwrap();
        let tenant = Tenant {
            organization_id: uuid::Uuid::from_u128(1),
            project_id: uuid::Uuid::from_u128(2),
            run_id: uuid::Uuid::from_u128(3),
        };
        let ok = |u: &str| resolve(u, Some(&root), &roots, &hosts, &sources, &tenant);
        assert!(matches!(ok("a.json"), Ok(Source::File(_))));
        assert!(matches!(
            ok(&format!("file://{}/a.json", root.display())),
            Ok(Source::File(_))
        ));
        assert!(matches!(
            ok("../../etc/passwd"),
            Err(FetchError::Refused { .. })
        ));
        assert!(matches!(
            ok("file:///etc/passwd"),
            Err(FetchError::Refused { .. })
        ));
        assert!(matches!(ok("/etc/passwd"), Err(FetchError::Refused { .. })));
        assert!(matches!(
            ok("missing.json"),
            Err(FetchError::NotFound { .. })
        ));
        assert!(matches!(
            ok("https://evil.example/x.json"),
            Err(FetchError::Refused { .. })
        ));
        assert!(matches!(
            ok("https://artifacts.internal/x/summary.json"),
            Ok(Source::Http(_))
        ));
        assert!(matches!(
            ok("http://127.0.0.1:9000/s.json"),
            Ok(Source::Http(_))
        ));
        assert!(matches!(
            ok("http://127.0.0.1:9001/s.json"),
            Err(FetchError::Refused { .. })
        ));
        assert!(matches!(
            ok("ftp://artifacts.internal/x"),
            Err(FetchError::Refused { .. })
        ));
        let own = format!("staging/{}/{}", tenant.organization_id, tenant.project_id);
        assert_eq!(
            ok(&format!("s3://bkt/{own}/b%20c.json")).unwrap(),
            Source::S3 {
                bucket: "bkt".into(),
                key: format!("{own}/b c.json")
            }
        );
        assert!(matches!(
            ok("s3://bkt/a/b.json"),
            Err(FetchError::Refused { reason, .. }) if reason.contains("s3.source_templates")
        ));
        assert!(matches!(ok("s3://bkt/"), Err(FetchError::Refused { .. })));
        assert!(matches!(
            resolve("a.json", None, &roots, &hosts, &sources, &tenant),
            Err(FetchError::Refused { .. })
        ));
        // Without templates no s3 source is allowed at all.
        assert!(matches!(
            resolve(
                &format!("s3://bkt/{own}/b.json"),
                None,
                &roots,
                &hosts,
                &S3Sources::default(),
                &tenant
            ),
            Err(FetchError::Refused { .. })
        ));
        // Credentials are used for the fetch but never shown.
        let err = ok("https://user:secret@evil.example/x.json?token=abc").unwrap_err();
        assert!(matches!(
            &err,
            FetchError::Refused { uri, .. } if uri == "https://evil.example/x.json?token=REDACTED"
        ));
        let source = ok("https://user:secret@artifacts.internal/x.json").unwrap();
        assert!(!format!("{source:?}").contains("secret"), "{source:?}");
        let err = ok("s3://user:secret@bkt/a.json").unwrap_err();
        assert!(!format!("{err} {err:?}").contains("secret"), "{err:?}");
    }

    #[test]
    fn gzip_inflation_is_capped() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 1_000_000]).unwrap();
        std::fs::write(&p, enc.finish().unwrap()).unwrap();
        assert!(matches!(
            read_maybe_gzip("u", &p, 1_000_000, 1000),
            Err(FetchError::TooLarge { limit: 1000, .. })
        ));
        assert_eq!(
            read_maybe_gzip("u", &p, 1_000_000, 2_000_000)
                .unwrap()
                .len(),
            1_000_000
        );
        std::fs::write(&p, [0x1f, 0x8b, 0, 1, 2, 3]).unwrap();
        assert!(matches!(
            read_maybe_gzip("u", &p, 100, 100),
            Err(FetchError::Corrupt { .. })
        ));
        assert!(matches!(
            read_maybe_gzip("u", &p, 3, 100),
            Err(FetchError::TooLarge { limit: 3, .. })
        ));
    }

    #[test]
    fn inflated_lines_are_capped_while_they_stream() {
        use std::io::{BufRead, Write};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.ndjson.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for _ in 0..1000 {
            enc.write_all(&[b'x'; 999]).unwrap();
            enc.write_all(b"\n").unwrap();
        }
        std::fs::write(&p, enc.finish().unwrap()).unwrap();
        let count = |cap: u64| -> std::io::Result<usize> {
            let mut r = open_lines_capped(&p, cap)?;
            let mut n = 0;
            let mut buf = Vec::new();
            while r.read_until(b'\n', &mut buf)? > 0 {
                n += 1;
                buf.clear();
            }
            Ok(n)
        };
        assert_eq!(count(1_000_000).unwrap(), 1000, "exactly at the cap");
        let err = count(999_999).unwrap_err();
        assert!(
            err.get_ref()
                .is_some_and(|e| e.downcast_ref::<InflatedTooLarge>().is_some()),
            "{err}"
        );
    }

    #[test]
    fn a_summary_is_read_into_one_buffer_within_its_cap() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json.gz");
        let body = vec![b'7'; 300_000];
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&body).unwrap();
        let mut gz = enc.finish().unwrap();
        std::fs::write(&p, &gz).unwrap();
        let out = read_maybe_gzip("u", &p, 1 << 20, 300_000).unwrap();
        assert_eq!(out, body);
        assert!(out.capacity() <= 300_001, "{}", out.capacity());
        // A trailer that claims 10 bytes: the buffer regrows, still within the cap.
        let n = gz.len();
        gz[n - 4..].copy_from_slice(&10u32.to_le_bytes());
        std::fs::write(&p, &gz).unwrap();
        assert!(matches!(
            read_maybe_gzip("u", &p, 1 << 20, 299_999),
            Err(FetchError::TooLarge { limit: 299_999, .. })
        ));
        let plain = dir.path().join("s.json");
        std::fs::write(&plain, b"{}").unwrap();
        let out = read_maybe_gzip("u", &plain, 2, 0).unwrap();
        assert_eq!(out, b"{}");
    }
}
