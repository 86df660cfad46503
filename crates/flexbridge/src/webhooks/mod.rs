//! `flexbridge webhooks ...` and `flexbridge interactions attach-webhook`: Flex webhook
//! registrations from the command line, and `ensure`, which makes Twilio match the
//! `[[webhooks]]` of a configuration file.

pub mod declarations;

use declarations::{
    unknown_event_message, unknown_events, url_with_overrides, WebhookDecl, MANAGED_PREFIX,
};
use flexbridge_core::Secret;
use flexbridge_flex_api::{Credentials, FlexClient, FlexError, Webhook, WebhookSpec, WebhookType};
use http::StatusCode;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

/// How to reach the Flex API. Global: accepted before or after the subcommand
/// (`flexbridge webhooks list --output json` and `flexbridge webhooks --output json list`).
#[derive(clap::Args)]
pub struct ApiArgs {
    /// Flex API base URL (for proxies and tests).
    #[arg(
        long,
        global = true,
        env = "FLEXBRIDGE_FLEX_API_URL",
        default_value = "https://flex-api.twilio.com"
    )]
    base_url: String,
    /// Account SID for HTTP Basic auth (with --auth-token).
    #[arg(long, global = true, env = "TWILIO_ACCOUNT_SID")]
    account_sid: Option<String>,
    /// Auth Token (with --account-sid).
    #[arg(long, global = true, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// API key SID (with --api-secret); preferred over the Auth Token when given.
    #[arg(long, global = true, env = "TWILIO_API_KEY")]
    api_key: Option<String>,
    /// API key secret.
    #[arg(long, global = true, env = "TWILIO_API_SECRET", hide_env_values = true)]
    api_secret: Option<String>,
    /// Flex instance SID (GO...).
    #[arg(long, global = true, env = "TWILIO_FLEX_INSTANCE_SID")]
    instance_sid: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

/// A registration's settings on the command line.
#[derive(clap::Args)]
pub struct SpecArgs {
    /// `global` or `interaction`.
    #[arg(long = "type", value_enum)]
    kind: Option<KindArg>,
    /// The URL Twilio calls.
    #[arg(long)]
    url: Option<String>,
    /// HTTP method Twilio uses.
    #[arg(long, value_parser = ["POST", "GET"])]
    method: Option<String>,
    /// An event to subscribe to (repeat for several).
    #[arg(long = "event")]
    events: Vec<String>,
    /// Friendly name.
    #[arg(long)]
    friendly_name: Option<String>,
    /// Send event names outside the seven documented ones.
    #[arg(long)]
    allow_unknown_event: bool,
    /// Twilio connection overrides appended to the URL as `#...`, e.g. `rc=3&rp=5xx,ct,rt`
    /// so Twilio retries on 5xx (whether Interactions webhooks honour them is unconfirmed).
    #[arg(long)]
    connection_overrides: Option<String>,
}

/// `--type` values.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum KindArg {
    /// Every subscribed event of the instance.
    Global,
    /// Only Interactions that carry the ttid.
    Interaction,
}

impl From<KindArg> for WebhookType {
    fn from(kind: KindArg) -> Self {
        match kind {
            KindArg::Global => WebhookType::Global,
            KindArg::Interaction => WebhookType::Interaction,
        }
    }
}

/// `webhooks` subcommands.
#[derive(clap::Subcommand)]
pub enum WebhooksCommand {
    /// Register a webhook; prints its ttid.
    Create(SpecArgs),
    /// List registrations (every page).
    List {
        /// Only this type.
        #[arg(long = "type", value_enum)]
        kind: Option<KindArg>,
    },
    /// Show one registration.
    Get {
        /// The ttid (flex_interactionwebhook_...).
        ttid: String,
    },
    /// Change a registration; options not given keep their current value.
    Update {
        /// The ttid.
        ttid: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Delete a registration.
    Delete {
        /// The ttid.
        ttid: String,
    },
    /// Make Twilio's registrations match the `[[webhooks]]` of a configuration file: create
    /// what is missing, update what drifted, leave the rest alone.
    Ensure {
        /// Configuration file with `[[webhooks]]`.
        #[arg(long, short, env = "FLEXBRIDGE_CONFIG")]
        config: Option<PathBuf>,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
        /// Also delete registrations flexbridge manages (friendly name `flexbridge:...`) that
        /// the file no longer lists. Others are never touched.
        #[arg(long)]
        prune: bool,
    },
}

/// `interactions` subcommands.
#[derive(clap::Subcommand)]
pub enum InteractionsCommand {
    /// Attach an `interaction` webhook to an Interaction (`WebhookTtid`).
    AttachWebhook {
        /// The Interaction SID (KD...).
        #[arg(long)]
        interaction: String,
        /// The webhook's ttid.
        #[arg(long)]
        ttid: String,
    },
}

impl ApiArgs {
    fn client(&self) -> Result<FlexClient, FlexError> {
        let credentials = match (&self.api_key, &self.api_secret, &self.account_sid, &self.auth_token) {
            (Some(key), Some(secret), _, _) => Credentials { username: key.clone(), password: Secret::new(secret.clone()) },
            (_, _, Some(sid), Some(token)) => Credentials { username: sid.clone(), password: Secret::new(token.clone()) },
            _ => {
                return Err(FlexError::Invalid(
                    "credentials are missing: set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN, or TWILIO_API_KEY and TWILIO_API_SECRET (or the matching flags)".to_owned(),
                ))
            }
        };
        FlexClient::new(&self.base_url, &credentials)
    }

    fn instance(&self) -> Result<&str, FlexError> {
        self.instance_sid.as_deref().ok_or_else(|| {
            FlexError::Invalid("the Flex instance is missing: set TWILIO_FLEX_INSTANCE_SID or --instance-sid (GO...)".to_owned())
        })
    }
}

/// Runs a `webhooks` subcommand; errors are printed plainly with the documented exit code.
pub async fn run(api: ApiArgs, command: WebhooksCommand) -> ExitCode {
    finish(webhooks(&api, command).await)
}

/// Runs an `interactions` subcommand.
pub async fn run_interactions(api: ApiArgs, command: InteractionsCommand) -> ExitCode {
    finish(interactions(&api, command).await)
}

fn finish(result: Result<ExitCode, FlexError>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("flexbridge: {error}");
            if let Some(hint) = hint(&error) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(exit_code(&error))
        }
    }
}

/// The process exit code for a failed call (documented in the README).
fn exit_code(error: &FlexError) -> u8 {
    match error {
        FlexError::Api { status, .. }
            if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN =>
        {
            3
        }
        FlexError::Api { status, .. } if *status == StatusCode::NOT_FOUND => 4,
        FlexError::Api { status, .. } if status.is_client_error() => 5,
        FlexError::Api { .. } | FlexError::Decode { .. } => 6,
        FlexError::Network { .. } | FlexError::Timeout { .. } => 7,
        FlexError::Invalid(_) => 2,
    }
}

/// What to check next, for the answers where the cause is usually on our side.
fn hint(error: &FlexError) -> Option<&'static str> {
    let FlexError::Api { status, .. } = error else {
        return None;
    };
    match *status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Some("check TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN or TWILIO_API_KEY/TWILIO_API_SECRET")
        }
        StatusCode::NOT_FOUND => {
            Some("check the Flex instance SID (TWILIO_FLEX_INSTANCE_SID) and the ttid")
        }
        StatusCode::BAD_REQUEST => {
            Some("a parameter was refused: check the URL, method and event names")
        }
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            Some("Twilio is busy; retried, then gave up")
        }
        _ => None,
    }
}

async fn interactions(api: &ApiArgs, command: InteractionsCommand) -> Result<ExitCode, FlexError> {
    let InteractionsCommand::AttachWebhook { interaction, ttid } = command;
    let answer = api.client()?.attach_webhook(&interaction, &ttid).await?;
    match api.output {
        Output::Json => println!("{answer}"),
        Output::Table => println!("webhook {ttid} attached to interaction {interaction}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn spec_from(args: &SpecArgs, base: Option<&Webhook>) -> Result<WebhookSpec, FlexError> {
    let url = args
        .url
        .clone()
        .or_else(|| base.and_then(|w| w.webhook_url.clone()))
        .ok_or_else(|| FlexError::Invalid("--url is required".to_owned()))?;
    let url = match &args.connection_overrides {
        Some(overrides) => url_with_overrides(&url, Some(overrides)),
        None => url,
    };
    let events = if args.events.is_empty() {
        base.map(|w| w.webhook_events.clone()).unwrap_or_default()
    } else {
        args.events.clone()
    };
    if events.is_empty() {
        return Err(FlexError::Invalid(
            "at least one --event is required".to_owned(),
        ));
    }
    if !args.allow_unknown_event {
        if let Some(unknown) = unknown_events(&events).next() {
            return Err(FlexError::Invalid(format!(
                "unknown event: {} (--allow-unknown-event sends it anyway)",
                unknown_event_message(unknown)
            )));
        }
    }
    let kind = match (args.kind, base.and_then(|w| w.kind.as_deref())) {
        (Some(kind), _) => kind.into(),
        (None, Some("interaction")) => WebhookType::Interaction,
        _ => WebhookType::Global,
    };
    Ok(WebhookSpec {
        kind,
        url,
        method: args
            .method
            .clone()
            .or_else(|| base.and_then(|w| w.webhook_method.clone()))
            .unwrap_or_else(|| "POST".to_owned()),
        events,
        friendly_name: args
            .friendly_name
            .clone()
            .or_else(|| base.and_then(|w| w.friendly_name.clone())),
    })
}

async fn webhooks(api: &ApiArgs, command: WebhooksCommand) -> Result<ExitCode, FlexError> {
    let client = api.client()?;
    let instance = api.instance()?;
    match command {
        WebhooksCommand::Create(args) => {
            let spec = spec_from(&args, None)?;
            let created = client.create_webhook(instance, &spec).await?;
            show_one(api.output, &created);
            if api.output == Output::Table && spec.kind == WebhookType::Interaction {
                println!(
                    "\nThis interaction webhook fires only for Interactions that carry its ttid: attach it with\n  flexbridge interactions attach-webhook --interaction KD... --ttid {}\nor pass WebhookTtid={} when creating an Interaction.",
                    created.ttid, created.ttid
                );
            }
        }
        WebhooksCommand::List { kind } => show(
            api.output,
            &client.list_webhooks(instance, kind.map(Into::into)).await?,
        ),
        WebhooksCommand::Get { ttid } => {
            show_one(api.output, &client.get_webhook(instance, &ttid).await?)
        }
        WebhooksCommand::Update { ttid, spec } => {
            let current = client.get_webhook(instance, &ttid).await?;
            let spec = spec_from(&spec, Some(&current))?;
            show_one(
                api.output,
                &client.update_webhook(instance, &ttid, &spec).await?,
            );
        }
        WebhooksCommand::Delete { ttid } => {
            client.delete_webhook(instance, &ttid).await?;
            match api.output {
                Output::Json => println!("{}", serde_json::json!({ "deleted": ttid })),
                Output::Table => println!("deleted {ttid}"),
            }
        }
        WebhooksCommand::Ensure {
            config,
            dry_run,
            prune,
        } => {
            let declared = match declarations::load(config.as_deref()) {
                Ok(declared) => declared,
                Err(errors) => {
                    eprintln!("flexbridge: {errors}");
                    return Ok(ExitCode::from(64));
                }
            };
            return ensure(&client, instance, api.output, &declared, dry_run, prune).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

enum Step {
    Create(WebhookSpec),
    Update(String, WebhookSpec),
    Replace(String, WebhookSpec),
    Delete(String, String),
    Keep(String, String),
}

fn matches(existing: &Webhook, spec: &WebhookSpec) -> bool {
    let events = |list: &[String]| list.iter().cloned().collect::<BTreeSet<_>>();
    existing.webhook_url.as_deref() == Some(spec.url.as_str())
        && existing
            .webhook_method
            .as_deref()
            .map(str::to_ascii_uppercase)
            == Some(spec.method.to_ascii_uppercase())
        && events(&existing.webhook_events) == events(&spec.events)
        && existing.kind.as_deref().unwrap_or("global") == spec.kind.as_str()
}

async fn ensure(
    client: &FlexClient,
    instance: &str,
    output: Output,
    declared: &[WebhookDecl],
    dry_run: bool,
    prune: bool,
) -> Result<ExitCode, FlexError> {
    let existing = client.list_webhooks(instance, None).await?;
    let managed: Vec<&Webhook> = existing
        .iter()
        .filter(|w| {
            w.friendly_name
                .as_deref()
                .is_some_and(|n| n.starts_with(MANAGED_PREFIX))
        })
        .collect();
    let mut plan = Vec::new();
    for decl in declared {
        let spec = decl.spec();
        match managed
            .iter()
            .find(|w| w.friendly_name == spec.friendly_name)
        {
            None => plan.push(Step::Create(spec)),
            Some(w) if matches(w, &spec) => {
                plan.push(Step::Keep(w.ttid.clone(), decl.name.clone()))
            }
            Some(w) if w.kind.as_deref().unwrap_or("global") != spec.kind.as_str() => {
                plan.push(Step::Replace(w.ttid.clone(), spec))
            }
            Some(w) => plan.push(Step::Update(w.ttid.clone(), spec)),
        }
    }
    if prune {
        for w in &managed {
            let name = w.friendly_name.clone().unwrap_or_default();
            if !declared
                .iter()
                .any(|d| d.spec().friendly_name.as_deref() == Some(name.as_str()))
            {
                plan.push(Step::Delete(w.ttid.clone(), name));
            }
        }
    }
    let changes = plan.iter().filter(|s| !matches!(s, Step::Keep(..))).count();
    let mut report = Vec::new();
    for step in &plan {
        let (action, target) = match step {
            Step::Create(spec) => ("create", spec.friendly_name.clone().unwrap_or_default()),
            Step::Update(ttid, spec) => (
                "update",
                format!(
                    "{} ({ttid})",
                    spec.friendly_name.clone().unwrap_or_default()
                ),
            ),
            Step::Replace(ttid, spec) => (
                "replace",
                format!(
                    "{} ({ttid}, type changes)",
                    spec.friendly_name.clone().unwrap_or_default()
                ),
            ),
            Step::Delete(ttid, name) => ("delete", format!("{name} ({ttid})")),
            Step::Keep(ttid, name) => ("unchanged", format!("{MANAGED_PREFIX}{name} ({ttid})")),
        };
        report.push(serde_json::json!({ "action": action, "webhook": target }));
        if output == Output::Table {
            println!(
                "{}{action:<10} {target}",
                if dry_run { "would " } else { "" }
            );
        }
    }
    if !dry_run {
        for step in plan {
            match step {
                Step::Create(spec) => {
                    client.create_webhook(instance, &spec).await?;
                }
                Step::Update(ttid, spec) => {
                    client.update_webhook(instance, &ttid, &spec).await?;
                }
                Step::Replace(ttid, spec) => {
                    client.delete_webhook(instance, &ttid).await?;
                    client.create_webhook(instance, &spec).await?;
                }
                Step::Delete(ttid, _) => client.delete_webhook(instance, &ttid).await?,
                Step::Keep(..) => {}
            }
        }
    }
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "dry_run": dry_run, "changes": changes, "plan": report })
        ),
        Output::Table if changes == 0 => {
            println!("nothing to change: Twilio's registrations match the configuration")
        }
        Output::Table if dry_run => {
            println!("{changes} change(s) planned; nothing was changed (--dry-run)")
        }
        Output::Table => println!("{changes} change(s) made"),
    }
    Ok(ExitCode::SUCCESS)
}

/// One registration (`create`, `get`, `update`): a JSON object, or a one-row table.
fn show_one(output: Output, webhook: &Webhook) {
    match output {
        Output::Json => println!("{}", serde_json::to_value(webhook).unwrap_or_default()),
        Output::Table => show(output, std::slice::from_ref(webhook)),
    }
}

/// Registrations (`list`): a JSON array, or a table.
fn show(output: Output, webhooks: &[Webhook]) {
    if output == Output::Json {
        println!("{}", serde_json::to_value(webhooks).unwrap_or_default());
        return;
    }
    println!(
        "{:<50} {:<12} {:<6} {:<45} {:<22} EVENTS",
        "TTID", "TYPE", "METHOD", "URL", "FRIENDLY NAME"
    );
    for w in webhooks {
        println!(
            "{:<50} {:<12} {:<6} {:<45} {:<22} {}",
            w.ttid,
            w.kind.as_deref().unwrap_or("-"),
            w.webhook_method.as_deref().unwrap_or("-"),
            w.webhook_url.as_deref().unwrap_or("-"),
            w.friendly_name.as_deref().unwrap_or("-"),
            w.webhook_events.join(",")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flexbridge_flex_api::ApiError;

    fn api(status: StatusCode) -> FlexError {
        FlexError::Api {
            status,
            error: ApiError {
                code: Some(20404),
                message: Some("x".into()),
                more_info: None,
                status: Some(status.as_u16()),
            },
        }
    }

    #[test]
    fn exit_codes_and_hints_follow_the_readme() {
        for (status, code) in [
            (StatusCode::UNAUTHORIZED, 3),
            (StatusCode::FORBIDDEN, 3),
            (StatusCode::NOT_FOUND, 4),
            (StatusCode::BAD_REQUEST, 5),
            (StatusCode::INTERNAL_SERVER_ERROR, 6),
        ] {
            assert_eq!(exit_code(&api(status)), code, "{status}");
        }
        assert_eq!(exit_code(&FlexError::Invalid("x".into())), 2);
        assert_eq!(
            exit_code(&FlexError::Timeout {
                url: "u".into(),
                timeout: std::time::Duration::from_secs(1)
            }),
            7
        );
        assert!(hint(&api(StatusCode::NOT_FOUND))
            .is_some_and(|h| h.contains("TWILIO_FLEX_INSTANCE_SID")));
        assert!(hint(&api(StatusCode::INTERNAL_SERVER_ERROR)).is_none());
    }
}
