//! The `flexbridge` binary: command line, logging and wiring.

mod admin;
mod config;
mod daemon;
mod demo;
mod expand;
mod schema_cmd;
mod simulate_cmd;
mod sinks;
mod spool_cmd;
mod webhooks;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

// glibc's allocator contends on its arena locks under many small per-request allocations
// across worker threads; mimalloc does not (measured with scripts/bench.sh). It is built with
// `no_thp`: on a kernel whose transparent huge pages are `madvise`, mimalloc would ask for
// them on its eagerly committed arenas, and 2 MiB pages made the spool's peak RSS 52-60 MiB
// instead of 31-35 MiB at the same rate (heaptrack cannot see into mimalloc; the option
// MIMALLOC_ALLOW_THP=0 showed it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Receives Twilio Flex Interactions webhooks, proves they come from Twilio, normalizes them
/// to CloudEvents and acknowledges them only once every sink has confirmed them.
#[derive(Parser)]
#[command(name = "flexbridge", version, about)]
struct Cli {
    /// Log format on standard error.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "FLEXBRIDGE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `flexbridge_ingress=debug` (RUST_LOG also works).
    #[arg(long, global = true, env = "FLEXBRIDGE_LOG_LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    Run {
        /// Configuration file (.toml or .yaml); without it, embedded defaults.
        #[arg(long, short, env = "FLEXBRIDGE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig {
        /// Configuration file (.toml or .yaml).
        #[arg(long, short, env = "FLEXBRIDGE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Start a local daemon and send it one signed interaction lifecycle; no set-up needed.
    Demo,
    /// Send realistic, signed Flex traffic to a URL and report status counts and latency.
    Simulate(simulate_cmd::Args),
    /// Manage the Flex InteractionWebhooks registrations.
    Webhooks {
        #[command(flatten)]
        api: webhooks::ApiArgs,
        #[command(subcommand)]
        command: webhooks::WebhooksCommand,
    },
    /// The running daemon's spool (`delivery.mode = "spool"`).
    Spool {
        #[command(flatten)]
        admin: spool_cmd::AdminArgs,
        #[command(subcommand)]
        command: spool_cmd::SpoolCommand,
    },
    /// The spool's dead letters: events a sink refused for good.
    Dlq {
        #[command(flatten)]
        admin: spool_cmd::AdminArgs,
        #[command(subcommand)]
        command: spool_cmd::DlqCommand,
    },
    /// Act on Flex Interactions.
    Interactions {
        #[command(flatten)]
        api: webhooks::ApiArgs,
        #[command(subcommand)]
        command: webhooks::InteractionsCommand,
    },
    /// Print the JSON Schemas (draft 2020-12) of the CloudEvents flexbridge emits, or write
    /// them to a directory.
    Schema(schema_cmd::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.log_level.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flexbridge: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("flexbridge: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = level
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

fn load_config(path: Option<&std::path::Path>) -> Result<config::AppConfig, ExitCode> {
    config::load(path).map_err(|errors| {
        eprintln!("flexbridge: {errors}");
        ExitCode::from(EXIT_CONFIG)
    })
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let config = match load_config(config.as_deref()) {
                Ok(config) => config,
                Err(code) => return Ok(code),
            };
            let running = daemon::start(config).await?;
            let signal = daemon::termination_signal().await?;
            tracing::info!(signal, "termination signal received");
            // A second signal while draining means "now".
            tokio::spawn(async {
                if daemon::termination_signal().await.is_ok() {
                    tracing::warn!("second termination signal: exiting without draining");
                    std::process::exit(1);
                }
            });
            running.shutdown().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            let config = match load_config(config.as_deref()) {
                Ok(config) => config,
                Err(code) => return Ok(code),
            };
            print!("{}", config::to_redacted_toml(&config));
            eprintln!("flexbridge: configuration is valid");
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            demo::run().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate(args) => simulate_cmd::run(args).await,
        Command::Webhooks { api, command } => Ok(webhooks::run(api, command).await),
        Command::Interactions { api, command } => {
            Ok(webhooks::run_interactions(api, command).await)
        }
        Command::Schema(args) => schema_cmd::run(args),
        Command::Spool { admin, command } => spool_cmd::spool(&admin, command),
        Command::Dlq { admin, command } => spool_cmd::dlq(&admin, command),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `flexbridge ...` command in the README's shell blocks, continuation lines
    /// joined and comments removed; `[a|b]` becomes `a`, and `[--opt ...]` is dropped.
    fn readme_commands() -> Vec<Vec<String>> {
        let readme = include_str!("../../../README.md");
        let mut commands = Vec::new();
        let mut in_shell = false;
        let mut pending = String::new();
        for line in readme.lines() {
            if line.starts_with("```") {
                in_shell = line == "```sh";
                continue;
            }
            if !in_shell {
                continue;
            }
            let line = line.split(" # ").next().unwrap_or("").trim_end();
            pending.push_str(line.trim_end_matches('\\'));
            pending.push(' ');
            if line.ends_with('\\') {
                continue;
            }
            let text = std::mem::take(&mut pending);
            let text = text.trim();
            let Some(rest) = text
                .strip_prefix("flexbridge ")
                .or_else(|| text.strip_prefix("cargo run --release -- "))
            else {
                continue;
            };
            let mut words = vec!["flexbridge".to_owned()];
            let mut group: Option<String> = None;
            for word in rest.split_whitespace() {
                match &mut group {
                    None if word.starts_with('[') => {
                        let inner = word.trim_start_matches('[').to_owned();
                        if let Some(done) = inner.strip_suffix(']') {
                            words.extend(optional(done));
                        } else {
                            group = Some(inner);
                        }
                    }
                    Some(inner) => {
                        inner.push(' ');
                        inner.push_str(word.trim_end_matches(']'));
                        if word.ends_with(']') {
                            words.extend(optional(inner));
                            group = None;
                        }
                    }
                    None => words.push(word.to_owned()),
                }
            }
            commands.push(words);
        }
        commands
    }

    /// An optional group as the README writes it: `--type global|interaction` gives
    /// `--type global`; `--url ...` (a placeholder value) gives nothing.
    fn optional(inner: &str) -> Vec<String> {
        if inner.contains("...") {
            return Vec::new();
        }
        inner
            .split_whitespace()
            .map(|w| w.split('|').next().unwrap_or(w).to_owned())
            .collect()
    }

    #[test]
    fn the_readmes_commands_parse_as_written() {
        let commands = readme_commands();
        let webhooks: Vec<_> = commands
            .iter()
            .filter(|c| c.get(1).is_some_and(|w| w == "webhooks"))
            .collect();
        assert!(webhooks.len() >= 6, "{commands:?}");
        assert!(
            commands.iter().any(
                |c| c.iter().position(|w| w == "--output") > c.iter().position(|w| w == "list")
            ),
            "the README shows an option after the subcommand"
        );
        for command in &commands {
            if let Err(error) = Cli::try_parse_from(command) {
                panic!("{}: {error}", command.join(" "));
            }
        }
    }

    #[test]
    fn group_options_go_before_or_after_the_subcommand() {
        for args in [
            &[
                "flexbridge",
                "webhooks",
                "list",
                "--output",
                "json",
                "--base-url",
                "http://x",
            ][..],
            &[
                "flexbridge",
                "webhooks",
                "--output",
                "json",
                "list",
                "--base-url",
                "http://x",
            ],
            &[
                "flexbridge",
                "webhooks",
                "get",
                "TTID",
                "--instance-sid",
                "GO1",
                "--log-format",
                "json",
            ],
            &[
                "flexbridge",
                "interactions",
                "attach-webhook",
                "--interaction",
                "KD1",
                "--ttid",
                "T",
                "--account-sid",
                "AC1",
            ],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(matches!(
                cli.command,
                Command::Webhooks { .. } | Command::Interactions { .. }
            ));
        }
    }
}
