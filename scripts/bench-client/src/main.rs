//! berth-bench: a small CRI client used by berth's benchmark scripts
//! (`scripts/bench-*`). Each subcommand performs one kind of measurement
//! against a CRI endpoint and prints its results as JSON lines on stdout
//! (`lifecycle` one line per section, as each completes, plus tables on
//! stderr).

mod client;
mod lifecycle;
mod procmem;
mod pull;
mod stats;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "berth-bench",
    version,
    about = "CRI benchmark client for berth"
)]
struct Cli {
    /// CRI endpoint: `unix:///path/to.sock` or a bare socket path.
    #[arg(long, default_value = "unix:///run/berth/berth.sock")]
    endpoint: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time one PullImage (optionally after RemoveImage) and report the image.
    Pull(pull::Args),
    /// Time pod/container lifecycle RPCs; optionally memory with many pods
    /// held and ListContainers with many containers.
    Lifecycle(Box<lifecycle::Args>),
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(result) => {
            if let Some(result) = result {
                println!("{result}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the subcommand; a returned value is printed as its JSON line.
async fn run(cli: Cli) -> anyhow::Result<Option<serde_json::Value>> {
    let channel = client::connect(&cli.endpoint).await?;
    match cli.cmd {
        Cmd::Pull(args) => pull::run(channel, args).await.map(Some),
        Cmd::Lifecycle(args) => lifecycle::run(channel, *args).await.map(|()| None),
    }
}
