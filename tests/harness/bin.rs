//! The real binary in a child process.

use std::path::Path;
use std::process::{Command, Output};

use k6_ingest::config::Settings;

/// The binary with nothing from the developer's environment: the settings a test gives
/// are the only ones it sees.
pub fn bare_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_k6-ingest"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("K6_INGEST") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// The binary on the test's database and bucket, logging warnings only.
pub fn command(args: &[&str], db_url: &str, s: &Settings) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_k6-ingest"));
    cmd.args(args)
        .env("K6_INGEST__DATABASE__URL", db_url)
        .env("K6_INGEST__S3__BUCKET", s.s3.bucket.as_deref().unwrap())
        .env("K6_INGEST__S3__PREFIX", &s.s3.prefix)
        .env("K6_INGEST__LOG__LEVEL", "warn")
        .env_remove("K6_INGEST_TEST_ABORT_AFTER");
    cmd
}

/// `replay` of `dir`, one run at a time, its output discarded.
pub fn replay_command(dir: &Path, db_url: &str, s: &Settings) -> Command {
    let mut cmd = command(
        &["replay", dir.to_str().unwrap(), "--concurrency", "1"],
        db_url,
        s,
    );
    cmd.stdout(std::process::Stdio::null());
    cmd
}

/// Standard output and error together, for messages that may go to either.
pub fn all_output(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` and returns its exit status and its peak RSS in KiB, from the kernel.
pub fn exit_and_peak_rss(cmd: &mut Command) -> (i32, i64) {
    let child = cmd.spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet reaped; pointers are to live locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4 failed: {}", std::io::Error::last_os_error());
    std::mem::forget(child); // already reaped
    assert!(libc::WIFEXITED(status), "the child did not exit: {status}");
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}

/// Asserts that the child exited with status 0, showing its standard error otherwise.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// This process's resident set now, in KiB, after handing freed memory back to the kernel.
pub fn own_rss_kib() -> i64 {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Like [`exit_and_peak_rss`], for a figure that must be the child's own.
///
/// The kernel's peak of a child counts the memory it started with: a child made by
/// `vfork` (what `Command` uses by default) inherits the test process's own lifetime
/// peak, a forked one only the test's resident set at the fork. So the child is forked
/// (a `pre_exec` hook makes `Command` fork), freed memory is returned first, and the
/// test's own resident set must lie below the figure, which is then the binary's own.
pub fn forked_exit_and_peak_rss(cmd: &mut Command) -> (i32, i64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook does nothing (so it is async-signal-safe); it only makes the
    // standard library fork instead of vfork.
    unsafe {
        cmd.pre_exec(|| Ok(()));
    }
    let own = own_rss_kib();
    let (code, peak_kib) = exit_and_peak_rss(cmd);
    assert!(
        own < peak_kib,
        "the test held {own} KiB when it forked: the child's peak {peak_kib} KiB may be the test's"
    );
    (code, peak_kib)
}
