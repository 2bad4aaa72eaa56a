use clap::Parser;
use k6_ingest::cli::{Cli, run};
use k6_ingest::config::Settings;

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
