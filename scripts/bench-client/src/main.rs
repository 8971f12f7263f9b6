//! berth-bench: a small CRI client used by berth's benchmark scripts
//! (`scripts/bench-*`). Each subcommand performs one kind of measurement
//! against a CRI endpoint and prints its result as one JSON line on stdout.

mod client;
mod pull;

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
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(result) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<serde_json::Value> {
    let channel = client::connect(&cli.endpoint).await?;
    match cli.cmd {
        Cmd::Pull(args) => pull::run(channel, args).await,
    }
}
