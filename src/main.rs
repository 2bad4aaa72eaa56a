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
/// the Rust bindings name no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the system at once instead of 10 ms later. With the delay,
/// merging 64 near-cap parts of a split run peaked 60 to 66 MiB above the baseline,
/// at the 64 MiB a run in flight may cost (`tests/split_memory.rs`); at once, 41 MiB.
/// The worker's CPU per run stays 9 % below glibc's malloc (README "Measurements").
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
