use clap::Parser;
use k6_ingest::cli::{Cli, run};
use k6_ingest::config::Settings;

/// mimalloc instead of glibc's malloc: a run's path makes many short-lived allocations
/// across the runtime's threads (JSON trees, request buffers, sample lines), and glibc's
/// allocator took about a sixth of the worker's CPU (`_int_malloc`, `unlink_chunk`,
/// `malloc_consolidate` in `perf` at prefetch 32). `no_thp`: without it mimalloc asks
/// for transparent huge pages and the peak RSS rose by half. See [`purge_at_once`] for
/// the memory it keeps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the same in its v2 and v3);
/// the Rust bindings name no constant for it. The test below checks it is that option.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the system at once instead of up to a second later (the
/// default of mimalloc v3, which the crate builds). With the delay, merging 64 near-cap
/// parts of a split run peaked 59 to 69 MiB above the baseline, at or past the 64 MiB a
/// run in flight may cost (`tests/split_memory.rs`); at once, 40 to 43 MiB. The worker's
/// CPU per run stays 10 % below glibc's malloc (README "Measurements").
fn purge_at_once() {
    // SAFETY: sets an integer option, before any other thread exists (so nothing reads
    // it meanwhile); mimalloc reads the purge delay at each purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

fn main() -> std::process::ExitCode {
    purge_at_once();
    // What `#[tokio::main]` builds, after the allocator's option is set.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
        .block_on(run_cli())
}

async fn run_cli() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("k6-ingest: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    k6_ingest::telemetry::init(settings.log.format, &settings.log.level);
    match run(cli, settings).await {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("k6-ingest: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// The option set at start-up is the purge delay: its default in mimalloc v3
    /// (`options.c`) is 1000 ms, which its neighbours in the enum do not share (the
    /// eager commit delay is 1, the NUMA node count 0).
    #[test]
    fn the_option_set_at_start_up_is_mimallocs_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads an integer option.
        let delay = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, 1000);
    }
}
