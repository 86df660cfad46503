//! `flexbridge spool status` and `flexbridge dlq list|show|redrive|purge`: the running daemon's
//! spool, through its admin listener (the daemon holds the spool's files while it runs).
//! Dead letters and changes (redrive, purge) are served to loopback only: run these on the
//! daemon's host (in Kubernetes: `kubectl exec`).

use anyhow::{bail, Context as _};
use std::io::Write as _;
use std::process::ExitCode;

/// Where the daemon's admin listener is.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// The admin listener's base URL.
    #[arg(
        long,
        global = true,
        env = "FLEXBRIDGE_ADMIN_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    admin: String,
}

/// `flexbridge spool ...`
#[derive(clap::Subcommand)]
pub enum SpoolCommand {
    /// Bytes waiting, and per sink: depth, age of the oldest event, dead letters.
    Status,
}

/// `flexbridge dlq ...`
#[derive(clap::Subcommand)]
pub enum DlqCommand {
    /// The dead letters, with the sink, the reason and the event's id, type and Interaction SID.
    List {
        /// Only this sink's.
        #[arg(long)]
        sink: Option<String>,
    },
    /// One dead letter with its whole event.
    Show {
        /// The sink.
        sink: String,
        /// Its sequence number (from `list`).
        seq: u64,
    },
    /// Deliver the dead letters again (once the route is fixed); each leaves the dead letters
    /// when its sink confirms it.
    Redrive {
        /// Only this sink's.
        #[arg(long)]
        sink: Option<String>,
    },
    /// Drop the dead letters for good.
    Purge {
        /// Only this sink's.
        #[arg(long)]
        sink: Option<String>,
    },
}

fn query(sink: Option<&str>) -> String {
    sink.map(|s| {
        format!(
            "?{}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("sink", s)
                .finish()
        )
    })
    .unwrap_or_default()
}

/// Runs `spool status`.
pub fn spool(admin: &AdminArgs, command: SpoolCommand) -> anyhow::Result<ExitCode> {
    match command {
        SpoolCommand::Status => call(admin, "GET", "/spool"),
    }
}

/// Runs a `dlq` subcommand.
pub fn dlq(admin: &AdminArgs, command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List { sink } => call(admin, "GET", &format!("/dlq{}", query(sink.as_deref()))),
        DlqCommand::Show { sink, seq } => call(
            admin,
            "GET",
            &format!(
                "/dlq/{}/{seq}",
                form_urlencoded::byte_serialize(sink.as_bytes()).collect::<String>()
            ),
        ),
        DlqCommand::Redrive { sink } => call(
            admin,
            "POST",
            &format!("/dlq/redrive{}", query(sink.as_deref())),
        ),
        DlqCommand::Purge { sink } => call(
            admin,
            "POST",
            &format!("/dlq/purge{}", query(sink.as_deref())),
        ),
    }
}

/// One request to the admin listener; prints the JSON answer; exit 1 on an error answer.
fn call(admin: &AdminArgs, method: &str, path: &str) -> anyhow::Result<ExitCode> {
    let Some(authority) = admin
        .admin
        .strip_prefix("http://")
        .map(|rest| rest.split('/').next().unwrap_or(rest))
    else {
        bail!("--admin must be an http:// URL, not {:?}", admin.admin);
    };
    let mut stream = std::net::TcpStream::connect(authority).with_context(|| {
        format!("cannot reach the admin listener at {authority} (is the daemon running? --admin)")
    })?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let answer = flexbridge_simulate::read_answer(&mut stream)?;
    print!("{}", answer.text());
    if (200..300).contains(&answer.status) {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("flexbridge: the daemon answered {}", answer.status);
        Ok(ExitCode::FAILURE)
    }
}
