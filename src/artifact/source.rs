//! Which `s3://` objects a message may name, and how any source URI is shown.
//!
//! A message is untrusted, and an `s3://` URI is read with the worker's own credentials:
//! it is accepted only inside a prefix of the message's own tenant (`s3.source_templates`),
//! or a tenant could have another organization's objects parsed and copied as its own.
//! The key is decoded once and checked segment by segment, so no spelling (`..`, `%2e`,
//! `%2F`, a second encoding, backslashes) reaches past the prefix it was matched against.
//!
//! URIs may carry credentials (`user:pass@`, presigned query strings); [`redact_uri`] is the
//! one way a source URI is shown in errors, logs and stored rows.

use std::borrow::Cow;
use std::fmt;

use uuid::Uuid;

use crate::message::RunCompleted;

/// The run a message speaks for; its `s3://` sources must lie under this tenant's prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenant {
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub run_id: Uuid,
}

impl Tenant {
    pub fn of(msg: &RunCompleted) -> Self {
        Self {
            organization_id: msg.organization_id,
            project_id: msg.project_id,
            run_id: msg.run_id,
        }
    }
}

/// The placeholders a template may name for the message's tenant.
const ORGANIZATION: &str = "{organization_id}";
const PROJECT: &str = "{project_id}";
const RUN: &str = "{run_id}";

/// `s3.source_templates` with the settings they name (`{bucket}`, `{staging_prefix}`)
/// filled in: what the worker may read from S3, per tenant.
#[derive(Debug, Clone, Default)]
pub struct S3Sources {
    templates: Vec<String>,
}

impl S3Sources {
    /// Checks every template. One that names `{bucket}` while `s3.bucket` is unset is left
    /// out: without a bucket the worker has no S3 sources (nor an S3 client) anyway.
    pub fn new(
        templates: &[String],
        bucket: Option<&str>,
        staging_prefix: &str,
    ) -> Result<Self, String> {
        let mut kept = Vec::new();
        for template in templates {
            let filled = fill_settings(template, bucket.unwrap_or("bucket"), staging_prefix);
            check_template(template, &filled)?;
            if bucket.is_some() || !template.contains("{bucket}") {
                kept.push(filled);
            }
        }
        Ok(Self { templates: kept })
    }

    /// The prefixes `tenant`'s artifacts may come from.
    pub fn scopes(&self, tenant: &Tenant) -> Vec<S3Scope> {
        self.templates
            .iter()
            .filter_map(|t| S3Scope::parse(&fill_tenant(t, tenant)).ok())
            .collect()
    }

    /// Checks an `s3://` URI and returns its bucket and decoded key if it lies under one of
    /// `tenant`'s prefixes; otherwise why not.
    pub fn admit(&self, uri: &str, tenant: &Tenant) -> Result<(String, String), String> {
        let (bucket, key) = parse_s3_uri(uri)?;
        let segments: Vec<&str> = key.split('/').collect();
        let scopes = self.scopes(tenant);
        if scopes.iter().any(|s| s.contains(&bucket, &segments)) {
            return Ok((bucket, key));
        }
        let allowed = if scopes.is_empty() {
            "none".to_string()
        } else {
            scopes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(format!(
            "not under a prefix this run's organization and project may use \
             (s3.source_templates allows: {allowed})"
        ))
    }
}

/// A bucket and key prefix (whole segments) that artifacts may be read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Scope {
    bucket: String,
    prefix: Vec<String>,
}

impl S3Scope {
    /// `s3://bucket/` followed by zero or more key segments, each ended by `/`.
    fn parse(text: &str) -> Result<Self, String> {
        let rest = strip_scheme(text).ok_or("must start with s3://")?;
        let (bucket, prefix) = rest
            .split_once('/')
            .ok_or("must be s3://bucket/ followed by a key prefix ending in '/'")?;
        check_bucket(bucket)?;
        let Some(prefix) = prefix.strip_suffix('/').or(prefix.is_empty().then_some("")) else {
            return Err(format!(
                "the key prefix {prefix:?} must end in '/' (prefixes match whole segments)"
            ));
        };
        let prefix = if prefix.is_empty() {
            Vec::new()
        } else {
            check_key(prefix)?;
            prefix.split('/').map(str::to_string).collect()
        };
        Ok(Self {
            bucket: bucket.to_string(),
            prefix,
        })
    }

    /// Bucket equal, and the key's leading segments equal to the prefix's with at least
    /// one more (an object below the prefix, not the prefix itself).
    fn contains(&self, bucket: &str, key: &[&str]) -> bool {
        self.bucket == bucket
            && key.len() > self.prefix.len()
            && self.prefix.iter().zip(key).all(|(p, k)| p == k)
    }
}

impl fmt::Display for S3Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/", self.bucket)?;
        for segment in &self.prefix {
            write!(f, "{segment}/")?;
        }
        Ok(())
    }
}

fn fill_settings(template: &str, bucket: &str, staging_prefix: &str) -> String {
    // An empty staging prefix leaves no segment behind, as in the keys `submit` writes.
    let t = if staging_prefix.is_empty() {
        template.replace("{staging_prefix}/", "")
    } else {
        template.to_string()
    };
    t.replace("{staging_prefix}", staging_prefix)
        .replace("{bucket}", bucket)
}

fn fill_tenant(template: &str, tenant: &Tenant) -> String {
    template
        .replace(ORGANIZATION, &tenant.organization_id.to_string())
        .replace(PROJECT, &tenant.project_id.to_string())
        .replace(RUN, &tenant.run_id.to_string())
}

/// A template must bind both the organization and the project (or one tenant could read
/// another's objects), name no other placeholder, and give a well-formed prefix.
fn check_template(template: &str, filled: &str) -> Result<(), String> {
    let bad = |why: String| {
        if template == filled {
            Err(format!("template {template:?}: {why}"))
        } else {
            // Name the settings' part too: s3.bucket or s3.staging_prefix may be the cause.
            Err(format!("template {template:?} (as {filled:?}): {why}"))
        }
    };
    for required in [ORGANIZATION, PROJECT] {
        if !filled.contains(required) {
            return bad(format!(
                "must name {required}, so that each tenant reads only its own objects"
            ));
        }
    }
    let mut rest = filled;
    while let Some(open) = rest.find(['{', '}']) {
        let tail = &rest[open..];
        let Some(name) = [ORGANIZATION, PROJECT, RUN]
            .into_iter()
            .find(|p| tail.starts_with(p))
        else {
            return bad(format!(
                "unknown placeholder or stray brace at {:?} (known: {{bucket}}, \
                 {{staging_prefix}}, {ORGANIZATION}, {PROJECT}, {RUN})",
                tail.chars().take(20).collect::<String>()
            ));
        };
        rest = &tail[name.len()..];
    }
    // Any UUIDs: the shape of the prefix does not depend on whose it is.
    let sample = Tenant {
        organization_id: Uuid::nil(),
        project_id: Uuid::from_u128(1),
        run_id: Uuid::nil(),
    };
    match S3Scope::parse(&fill_tenant(filled, &sample)) {
        Ok(_) => Ok(()),
        Err(why) => bad(why),
    }
}

fn strip_scheme(uri: &str) -> Option<&str> {
    let head = uri.get(..5)?;
    head.eq_ignore_ascii_case("s3://").then(|| &uri[5..])
}

/// Splits `s3://bucket/key` without the URL parser's normalisation (which would resolve
/// `..` and `%2e` segments and drop tabs before anything could be checked) and decodes the
/// key exactly once.
pub fn parse_s3_uri(uri: &str) -> Result<(String, String), String> {
    let rest = strip_scheme(uri).ok_or("malformed s3 URI: expected s3://bucket/key")?;
    if rest.contains('#') {
        return Err("a fragment ('#') is not accepted in s3 URIs".into());
    }
    if rest.contains('?') {
        return Err("a query ('?') is not accepted in s3 URIs".into());
    }
    let (authority, raw_key) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.contains('@') {
        return Err("credentials (user:password@) are not accepted in s3 URIs".into());
    }
    if authority.contains(':') {
        return Err("a port is not accepted in s3 URIs".into());
    }
    check_bucket(authority)?;
    if raw_key.is_empty() {
        return Err("s3 URI without a key".into());
    }
    let key = decode_key(raw_key)?;
    check_key(&key)?;
    Ok((authority.to_string(), key))
}

/// S3's bucket naming rules, strictly: lowercase only, so no spelling of a bucket name
/// (case, percent-encoding, a trailing dot) can alias another.
fn check_bucket(bucket: &str) -> Result<(), String> {
    let valid_chars = bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let edges = bucket
        .bytes()
        .next()
        .zip(bucket.bytes().next_back())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    if (3..=63).contains(&bucket.len()) && valid_chars && edges && !bucket.contains("..") {
        Ok(())
    } else {
        Err(format!(
            "{:?} is not an S3 bucket name (3-63 lowercase letters, digits, '-' and '.')",
            escape_controls(bucket)
        ))
    }
}

/// Percent-decodes once. An escaped `/` is refused: it would be a separator to S3 but
/// was written to look like part of a segment.
fn decode_key(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
            let (Some(h), Some(l)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
                return Err("malformed percent-encoding in the s3 key".into());
            };
            let byte = (h * 16 + l) as u8;
            if byte == b'/' {
                return Err("an encoded '/' (%2F) is not accepted in s3 keys".into());
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the s3 key is not UTF-8 once decoded".to_string())
}

/// A decoded key (or template prefix) that means the same to every reader: no empty, `.`
/// or `..` segments, no backslashes or control characters, and no `%` left after the one
/// decoding (a second decoding anywhere would otherwise see something else).
fn check_key(key: &str) -> Result<(), String> {
    if key.len() > 1024 {
        return Err("the s3 key is longer than 1024 bytes".into());
    }
    if key.chars().any(char::is_control) {
        return Err("control characters are not accepted in s3 keys".into());
    }
    if key.contains('\\') {
        return Err("backslashes are not accepted in s3 keys".into());
    }
    if key.contains('%') {
        return Err("'%' in a decoded s3 key (double encoding) is not accepted".into());
    }
    for segment in key.split('/') {
        match segment {
            "" => {
                return Err(
                    "empty segments ('//', a leading or trailing '/') are not accepted in s3 keys"
                        .into(),
                );
            }
            "." | ".." => return Err("'.' and '..' segments are not accepted in s3 keys".into()),
            _ => {}
        }
    }
    Ok(())
}

/// What replaces a credential when a URI is shown.
pub const REDACTED: &str = "REDACTED";

/// A source URI as it may be shown: in errors, logs, dead-letter reasons, stored rows and
/// the replay table. Userinfo (`user:pass@`) is removed, query values (presigned
/// `X-Amz-Signature`, `X-Amz-Credential`, `token=`...) and fragments are replaced, and
/// control characters are escaped so a URI cannot forge a log line. The path is kept.
///
/// It reads the URI as leniently as a URL parser would (surrounding spaces, tabs and
/// newlines anywhere, `\` for `/`, `https:user:pass@host` without slashes), so nothing a
/// fetch would treat as credentials survives.
pub fn redact_uri(uri: &str) -> String {
    let cleaned: String = uri
        .trim_matches(|c: char| c <= ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    let (rest, fragment) = match cleaned.split_once('#') {
        Some((rest, fragment)) => (rest, Some(fragment)),
        None => (cleaned.as_str(), None),
    };
    let (head, query) = match rest.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (rest, None),
    };
    let mut out = strip_userinfo(head).into_owned();
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((name, _)) => format!("{name}={REDACTED}"),
                None if p.is_empty() => String::new(),
                None => REDACTED.to_string(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        if !fragment.is_empty() {
            out.push_str(REDACTED);
        }
    }
    escape_controls(&out).into_owned()
}

/// Removes `userinfo@` from the authority, if the text has one: after a scheme (and any
/// slashes), or after a leading `//`. A plain path is left alone: `@` is common in names.
fn strip_userinfo(head: &str) -> Cow<'_, str> {
    let scheme_end = head
        .find(':')
        .filter(|&i| {
            let scheme = &head[..i];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        })
        .map_or(0, |i| i + 1);
    let after = &head[scheme_end..];
    let slashes = after.len() - after.trim_start_matches(['/', '\\']).len();
    if scheme_end == 0 && slashes < 2 {
        return Cow::Borrowed(head);
    }
    let start = scheme_end + slashes;
    let end = head[start..]
        .find(['/', '\\'])
        .map_or(head.len(), |i| start + i);
    match head[start..end].rfind('@') {
        Some(at) => Cow::Owned(format!("{}{}", &head[..start], &head[start + at + 1..])),
        None => Cow::Borrowed(head),
    }
}

fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    format!("%{:02X}", c as u32)
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "0190f7d2-0000-7000-8000-000000000001";
    const PROJ: &str = "0190f7d2-0000-7000-8000-000000000002";
    const RUNID: &str = "0190f7d2-0000-7000-8000-0000000000aa";

    fn tenant() -> Tenant {
        Tenant {
            organization_id: ORG.parse().unwrap(),
            project_id: PROJ.parse().unwrap(),
            run_id: RUNID.parse().unwrap(),
        }
    }

    fn default_sources() -> S3Sources {
        S3Sources::new(
            &["s3://{bucket}/{staging_prefix}/{organization_id}/{project_id}/{run_id}/".into()],
            Some("k6-artifacts"),
            "k6-staging",
        )
        .unwrap()
    }

    fn own(file: &str) -> String {
        format!("s3://k6-artifacts/k6-staging/{ORG}/{PROJ}/{RUNID}/{file}")
    }

    #[test]
    fn the_default_template_admits_only_the_runs_own_staging_prefix() {
        let sources = default_sources();
        let t = tenant();
        assert_eq!(
            sources
                .scopes(&t)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [format!(
                "s3://k6-artifacts/k6-staging/{ORG}/{PROJ}/{RUNID}/"
            )]
        );
        assert_eq!(
            sources.admit(&own("summary.json"), &t).unwrap(),
            (
                "k6-artifacts".to_string(),
                format!("k6-staging/{ORG}/{PROJ}/{RUNID}/summary.json")
            )
        );
        // Deeper keys, and encoded characters that are not separators, are fine.
        assert_eq!(
            sources.admit(&own("sub/my%20summary.json"), &t).unwrap().1,
            format!("k6-staging/{ORG}/{PROJ}/{RUNID}/sub/my summary.json")
        );
        let other = "0190f7d2-0000-7000-8000-0000000000ff";
        for uri in [
            format!("s3://k6-artifacts/k6-staging/{other}/{PROJ}/{RUNID}/summary.json"),
            format!("s3://k6-artifacts/k6-staging/{ORG}/{other}/{RUNID}/summary.json"),
            format!("s3://k6-artifacts/k6-staging/{ORG}/{PROJ}/{other}/summary.json"),
            format!("s3://k6-artifacts/k6-runs/{ORG}/{PROJ}/{RUNID}/summary.json"),
            format!("s3://other-bucket/k6-staging/{ORG}/{PROJ}/{RUNID}/summary.json"),
            // The prefix itself is not an object, and a segment must match whole.
            format!("s3://k6-artifacts/k6-staging/{ORG}/{PROJ}/{RUNID}"),
            format!("s3://k6-artifacts/k6-staging/{ORG}/{PROJ}/{RUNID}x/summary.json"),
            format!(
                "s3://k6-artifacts/k6-staging/{ORG}/{PROJ}/{}/s.json",
                RUNID.to_uppercase()
            ),
        ] {
            let err = sources.admit(&uri, &t).unwrap_err();
            assert!(err.contains("s3.source_templates"), "{uri}: {err}");
        }
    }

    #[test]
    fn no_spelling_of_a_key_escapes_the_prefix() {
        let sources = default_sources();
        let t = tenant();
        let cases = [
            ("../../../x/summary.json", "'..'"),
            ("%2e%2e/%2e%2e/%2e%2e/x/summary.json", "'..'"),
            ("%2E%2E/summary.json", "'..'"),
            ("./summary.json", "'.'"),
            ("%2e/summary.json", "'.'"),
            ("..%2F..%2Fx%2Fsummary.json", "%2F"),
            ("sub%2fsummary.json", "%2F"),
            ("%252e%252e/%252e%252e/x/summary.json", "double encoding"),
            ("%25/summary.json", "double encoding"),
            ("sub//summary.json", "empty segments"),
            ("summary.json/", "empty segments"),
            ("..\\..\\x\\summary.json", "backslashes"),
            ("%5c..%5csummary.json", "backslashes"),
            ("summary.json%0a", "control"),
            ("summ\nary.json", "control"),
            ("summary%zz.json", "malformed"),
            ("summary%2", "malformed"),
            ("%ff%fe.json", "UTF-8"),
        ];
        for (tail, why) in cases {
            let uri = own(tail);
            let err = sources.admit(&uri, &t).unwrap_err();
            assert!(err.contains(why), "{uri}: {err}");
        }
        assert!(
            sources
                .admit(
                    &format!("s3://k6-artifacts//k6-staging/{ORG}/{PROJ}/{RUNID}/s.json"),
                    &t
                )
                .unwrap_err()
                .contains("empty segments")
        );
    }

    #[test]
    fn the_authority_is_a_bucket_name_and_nothing_else() {
        let sources = default_sources();
        let t = tenant();
        let key = format!("k6-staging/{ORG}/{PROJ}/{RUNID}/summary.json");
        for (uri, why) in [
            (format!("s3://user:pass@k6-artifacts/{key}"), "credentials"),
            (format!("s3://user@k6-artifacts/{key}"), "credentials"),
            (format!("s3://k6-artifacts:9000/{key}"), "port"),
            (format!("s3://k6-artifacts/{key}?versionId=1"), "query"),
            (format!("s3://k6-artifacts/{key}#x"), "fragment"),
            (format!("s3://K6-Artifacts/{key}"), "bucket name"),
            (format!("s3://k6%2dartifacts/{key}"), "bucket name"),
            (format!("s3://k6-artifacts./{key}"), "bucket name"),
            (format!("s3:///{key}"), "bucket name"),
            ("s3://k6-artifacts".to_string(), "without a key"),
            ("s3://k6-artifacts/".to_string(), "without a key"),
            (format!(" s3://k6-artifacts/{key}"), "malformed"),
            (format!("s3:k6-artifacts/{key}"), "malformed"),
        ] {
            let err = sources.admit(&uri, &t).unwrap_err();
            assert!(err.contains(why), "{uri}: {err}");
        }
        // The scheme is case-insensitive, as in any URL.
        assert!(
            sources
                .admit(&format!("S3://k6-artifacts/{key}"), &t)
                .is_ok()
        );
    }

    #[test]
    fn templates_are_checked_when_loaded() {
        let load = |t: &str| S3Sources::new(&[t.to_string()], Some("k6-artifacts"), "k6-staging");
        for (template, why) in [
            ("s3://{bucket}/{staging_prefix}/", "{organization_id}"),
            ("s3://{bucket}/{organization_id}/", "{project_id}"),
            ("s3://{bucket}/{organization_id}/{project_id}", "end in '/'"),
            (
                "s3://{bucket}/{organization_id}/{project_id}/{tenant}/",
                "unknown placeholder",
            ),
            (
                "s3://{bucket}/{organization_id}/{project_id}/}/",
                "stray brace",
            ),
            ("s3://{bucket}/../{organization_id}/{project_id}/", "'..'"),
            (
                "s3://{bucket}//{organization_id}/{project_id}/",
                "empty segments",
            ),
            ("s3://Bucket/{organization_id}/{project_id}/", "bucket name"),
            ("https://{bucket}/{organization_id}/{project_id}/", "s3://"),
            ("s3://{bucket}{organization_id}{project_id}", "s3://bucket/"),
        ] {
            let err = load(template).unwrap_err();
            assert!(
                err.contains(why) && err.contains(template),
                "{template}: {err}"
            );
        }
        // A bad s3.bucket or s3.staging_prefix shows in the filled-in template.
        let err = S3Sources::new(
            &["s3://{bucket}/{staging_prefix}/{organization_id}/{project_id}/".to_string()],
            Some("Legacy_Bucket"),
            "k6-staging",
        )
        .unwrap_err();
        assert!(err.contains("as \"s3://Legacy_Bucket/k6-staging/"), "{err}");
        // Tenant placeholders may sit in the bucket, and the prefix may then be empty.
        let per_tenant = S3Sources::new(
            &["s3://k6-{organization_id}/{project_id}/".to_string()],
            None,
            "",
        )
        .unwrap();
        assert!(
            per_tenant
                .admit(&format!("s3://k6-{ORG}/{PROJ}/any/summary.json"), &tenant())
                .is_ok()
        );
        // An empty staging prefix leaves no empty segment, as in submit's keys.
        let no_staging = S3Sources::new(
            &["s3://{bucket}/{staging_prefix}/{organization_id}/{project_id}/".to_string()],
            Some("b-1"),
            "",
        )
        .unwrap();
        assert!(
            no_staging
                .admit(&format!("s3://b-1/{ORG}/{PROJ}/r/summary.json"), &tenant())
                .is_ok()
        );
        // Without a bucket, templates naming it cannot admit anything.
        let unset = S3Sources::new(
            &["s3://{bucket}/{organization_id}/{project_id}/".to_string()],
            None,
            "k6-staging",
        )
        .unwrap();
        assert!(unset.scopes(&tenant()).is_empty());
        assert!(
            unset
                .admit(&format!("s3://bucket/{ORG}/{PROJ}/s.json"), &tenant())
                .unwrap_err()
                .contains("allows: none")
        );
    }

    #[test]
    fn redaction_removes_credentials_and_query_values_and_keeps_the_path() {
        for (uri, shown) in [
            (
                "https://user:secret@host.example/runs/1/summary.json",
                "https://host.example/runs/1/summary.json",
            ),
            ("http://user@host:8080/a", "http://host:8080/a"),
            ("http://u:p@ss@host/a", "http://host/a"),
            ("s3://user:secret@bucket/k/s.json", "s3://bucket/k/s.json"),
            (
                "https://b.s3.amazonaws.com/k/s.json?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc&token",
                "https://b.s3.amazonaws.com/k/s.json?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED&REDACTED",
            ),
            ("https://h/p#access_token=x", "https://h/p#REDACTED"),
            // What a URL parser would still read as credentials.
            ("  https://user:secret@h/p", "https://h/p"),
            ("ht\ntps://user:sec\tret@h/p", "https://h/p"),
            ("https:user:secret@h/p", "https:h/p"),
            ("https:\\\\user:secret@h\\p", "https:\\\\h\\p"),
            ("//user:secret@h/p", "//h/p"),
            // Paths are shown as they are, control characters escaped.
            ("runs/a@b/summary.json", "runs/a@b/summary.json"),
            ("/data/x\u{1b}[31m.json", "/data/x%1B[31m.json"),
            (
                "http://127.0.0.1:9000/s.json",
                "http://127.0.0.1:9000/s.json",
            ),
            ("summary.json", "summary.json"),
        ] {
            assert_eq!(redact_uri(uri), shown, "{uri:?}");
        }
    }
}
