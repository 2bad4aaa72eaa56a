use clap::Parser;
use k6_ingest::cli::{Cli, run};
use k6_ingest::config::Settings;

/// mimalloc instead of glibc's malloc: a run's path makes many short-lived allocations
/// across the runtime's threads (JSON trees, request buffers, sample lines), and glibc's
/// allocator took about a sixth of the worker's CPU (`_int_malloc`, `unlink_chunk`,
/// `malloc_consolidate` in `perf` at prefetch 32). `no_thp`: without it mimalloc asks
/// for transparent huge pages and the peak RSS rose by half.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
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
