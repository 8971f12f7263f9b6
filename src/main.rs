//! berth: a Kubernetes node agent serving CRI v1.

mod cgroup;
mod check;
mod config;
mod container;
mod failpoint;
mod features;
mod handlers;
mod image;
mod linux;
mod metrics;
mod monitor;
mod network;
mod pod;
mod server;
mod store;
mod streaming;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "A Kubernetes node agent: CRI v1 runtime and image service"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the CRI RuntimeService and ImageService on a unix socket.
    Serve {
        /// TOML config file (default: /etc/berth/config.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// CRI socket path.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Persistent state directory.
        #[arg(long)]
        root: Option<PathBuf>,
        /// Volatile state directory.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// containers-registries.conf(5) v2 file.
        #[arg(long)]
        registries_config: Option<PathBuf>,
        /// Log filter (error, warn, info, debug, trace).
        #[arg(long)]
        log_level: Option<String>,
    },
    /// Report what this host offers berth; non-zero exit if something needed is missing.
    Check,
    /// The pod infra process (started by berth itself).
    #[command(hide = true)]
    Pause {
        /// The pod this process holds the namespaces of.
        #[arg(long)]
        pod: String,
        /// The pods directory of the daemon that started it.
        #[arg(long)]
        pods_dir: Option<PathBuf>,
    },
    /// A container's monitor (started by berth itself).
    #[command(hide = true)]
    Monitor {
        /// The monitor.json written by the daemon.
        #[arg(long, required_unless_present = "zygote")]
        config: Option<PathBuf>,
        /// Serve monitor launches on stdin (see monitor/zygote.rs).
        #[arg(long, conflicts_with = "config")]
        zygote: bool,
        /// Room in the argument area for the monitors' titles.
        #[arg(long, hide = true)]
        title_room: Option<String>,
    },
    /// Report as JSON what the kernel can idmap (run by berth itself, in a
    /// process of its own: it makes scratch mounts in a private namespace).
    #[command(hide = true)]
    ProbeIdmap {
        /// A directory on the filesystem whose idmap support is wanted.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the full default configuration with a comment per key.
    Default,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    linux::selfexe::name_after_argv0();
    match cli.cmd {
        Cmd::Serve {
            config,
            socket,
            root,
            state_dir,
            registries_config,
            log_level,
        } => {
            let overrides = config::Overrides {
                socket,
                root,
                state_dir,
                registries_config,
                log_level,
            };
            match run_serve(config, overrides) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("berth: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Pause { .. } => pod::pause::run(),
        Cmd::Monitor { zygote: true, .. } => monitor::zygote::serve(),
        Cmd::Monitor { config, .. } => monitor::run(&config.unwrap_or_default()),
        Cmd::ProbeIdmap { dir } => match linux::idmap::probe(&dir) {
            Ok(support) => {
                println!("{}", serde_json::to_string(&support).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berth probe-idmap: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Check => {
            if check::print_report(&check::run_checks()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Cmd::Config {
            cmd: ConfigCmd::Default,
        } => {
            print!("{}", config::default_toml());
            ExitCode::SUCCESS
        }
    }
}

fn run_serve(path: Option<PathBuf>, overrides: config::Overrides) -> anyhow::Result<()> {
    // Before any thread exists: from here on berth runs from a sealed copy.
    linux::selfexe::reexec_sealed()?;
    let cfg = config::Config::load(path.as_deref(), overrides)?;
    let filter = tracing_subscriber::EnvFilter::try_new(log_directive(&cfg.log_level))
        .map_err(|e| anyhow::anyhow!("log_level {:?}: {e}", cfg.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(server::serve(cfg))?;
    Ok(())
}

/// A bare level applies to berth; libraries (h2, hyper, rustls) stay at warn
/// unless a full directive asks for them.
fn log_directive(level: &str) -> String {
    if level.contains(['=', ',']) {
        level.to_string()
    } else {
        format!("warn,berth={level}")
    }
}
