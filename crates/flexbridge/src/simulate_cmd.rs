//! `flexbridge simulate`: its arguments and how they become a simulator run.

use flexbridge_simulate::{self as simulate, traffic};
use std::process::ExitCode;
use std::time::Duration;

/// `flexbridge simulate` arguments.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("stop").args(["count", "duration"])))]
pub struct Args {
    /// The webhook URL (http://).
    #[arg(long)]
    url: String,
    /// Auth Token to sign with (HMAC-SHA1); without it and without a SharedKey the
    /// requests are unsigned.
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Sign with a SharedKey (HMAC-SHA256) instead: its key id...
    #[arg(long, requires = "shared_key_secret")]
    shared_key_id: Option<String>,
    /// ...and its secret.
    #[arg(long, requires = "shared_key_id", hide_env_values = true)]
    shared_key_secret: Option<String>,
    /// HTTP method: POST sends a form body, GET puts the parameters in the query.
    #[arg(long, value_enum, default_value = "post")]
    method: HttpMethod,
    /// Send POST bodies as JSON with bodySHA256 instead of a form.
    #[arg(long, conflicts_with = "method")]
    json: bool,
    /// Number of requests (default 100 without --duration).
    #[arg(long)]
    count: Option<u64>,
    /// Send for this long, e.g. `30s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Requests per second in all (default: as fast as answered).
    #[arg(long)]
    rate: Option<f64>,
    /// Concurrent connections, each with one request in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Account SID of the generated traffic (default: random).
    #[arg(long)]
    account_sid: Option<String>,
    /// Seed for reproducible traffic.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the summary as JSON.
    #[arg(long)]
    json_summary: bool,
    /// Do not draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// `--method` values.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum HttpMethod {
    /// A form body.
    Post,
    /// Parameters in the query string.
    Get,
}

/// Runs the traffic and prints the summary; exit 1 when any answer was not 2xx.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Args {
        url,
        auth_token,
        shared_key_id,
        shared_key_secret,
        method,
        json,
        count,
        duration,
        rate,
        concurrency,
        account_sid,
        seed,
        json_summary,
        no_progress,
    } = args;
    let signer = match (shared_key_id, shared_key_secret, auth_token) {
        (Some(id), Some(secret), _) => simulate::Signer::SharedKey(id, secret),
        (_, _, Some(token)) => simulate::Signer::AuthToken(token),
        _ => {
            tracing::warn!("no --auth-token or SharedKey: requests are unsigned");
            simulate::Signer::None
        }
    };
    let encoding = match (json, method) {
        (true, _) => simulate::Encoding::Json,
        (false, HttpMethod::Post) => simulate::Encoding::Form,
        (false, HttpMethod::Get) => simulate::Encoding::Get,
    };
    let mut traffic = traffic::Traffic::new(String::new(), String::new(), rand::random());
    let summary = simulate::run(simulate::Options {
        url,
        signer,
        encoding,
        count,
        duration,
        rate,
        concurrency,
        account_sid: account_sid.unwrap_or_else(|| traffic.sid("AC")),
        instance_sid: traffic.sid("GO"),
        seed: seed.unwrap_or_else(rand::random),
        progress: !no_progress,
    })
    .await?;
    if json_summary {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.render());
    }
    Ok(if summary.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
