//! `flexbridge webhooks` and `flexbridge interactions` against a fake Flex API: a real HTTP
//! server, started here, that implements the documented contract (Basic auth, form bodies
//! with repeated WebhookEvents, the documented response shapes, paging with next_page_url,
//! 404 and Twilio error bodies, a 429 with Retry-After on demand).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use base64::Engine as _;
use bytes::Bytes;
use flexbridge_e2e::binary;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "fake-auth-token";
const INSTANCE: &str = "GO0123456789abcdef0123456789abcdef";

#[derive(Default)]
struct State {
    webhooks: BTreeMap<String, Value>,
    created: u32,
    busy_once: bool,
    /// (method, path, body) of every authorised request.
    log: Vec<(String, String, String)>,
}

struct FakeFlex {
    url: String,
    state: Arc<Mutex<State>>,
}

fn error(status: u16, code: i64, message: &str) -> (u16, Value) {
    (
        status,
        json!({"code": code, "message": message, "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status}),
    )
}

impl FakeFlex {
    fn start() -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let state = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let state = Arc::clone(&state);
                            async move {
                                Ok::<_, std::convert::Infallible>(handle(req, &state, addr).await)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Self {
            url: format!("http://{addr}"),
            state,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_as(TOKEN, args)
    }

    fn run_as(&self, token: &str, args: &[&str]) -> Output {
        Command::new(binary())
            .args(args)
            .env("FLEXBRIDGE_FLEX_API_URL", &self.url)
            .env("TWILIO_ACCOUNT_SID", ACCOUNT)
            .env("TWILIO_AUTH_TOKEN", token)
            .env("TWILIO_FLEX_INSTANCE_SID", INSTANCE)
            .env_remove("TWILIO_API_KEY")
            .env_remove("TWILIO_API_SECRET")
            .output()
            .unwrap()
    }

    fn webhooks(&self) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .webhooks
            .values()
            .cloned()
            .collect()
    }

    fn requests(&self) -> usize {
        self.state.lock().unwrap().log.len()
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: &Mutex<State>,
    addr: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let authorised = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT}:{TOKEN}"))
        ));
    let body =
        String::from_utf8(req.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let (status, value, retry_after) = {
        let mut s = state.lock().unwrap();
        if !authorised {
            let (st, v) = error(401, 20003, "Authenticate");
            (st, v, None)
        } else if std::mem::take(&mut s.busy_once) {
            let (st, v) = error(429, 20429, "Too Many Requests");
            (st, v, Some("1"))
        } else {
            s.log.push((method.clone(), path.clone(), body.clone()));
            let (st, v) = route(&mut s, &method, &path, &query, &body, addr);
            (st, v, None)
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(if status == 204 {
        String::new()
    } else {
        value.to_string()
    })));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", seconds.parse().unwrap());
    }
    response
}

fn route(
    s: &mut State,
    method: &str,
    path: &str,
    query: &BTreeMap<String, String>,
    body: &str,
    addr: std::net::SocketAddr,
) -> (u16, Value) {
    let form: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let events: Vec<String> = form
        .iter()
        .filter(|(k, _)| k == "WebhookEvents")
        .map(|(_, v)| v.clone())
        .collect();
    let base = format!("/v1/Instances/{INSTANCE}/InteractionWebhooks");
    if let Some(interaction) = path.strip_prefix("/v1/Interactions/") {
        return match field("WebhookTtid") {
            Some(ttid) if s.webhooks.contains_key(&ttid) => {
                (200, json!({"sid": interaction, "webhook_ttid": ttid}))
            }
            _ => error(400, 20001, "Invalid WebhookTtid"),
        };
    }
    if !path.starts_with(&base) {
        return error(404, 20404, "The requested resource was not found");
    }
    let ttid = path[base.len()..].trim_start_matches('/');
    match (method, ttid) {
        ("POST", "") => {
            if events.is_empty() || field("WebhookUrl").is_none() {
                return error(
                    400,
                    20001,
                    "Missing required parameter WebhookUrl or WebhookEvents",
                );
            }
            s.created += 1;
            let ttid = format!("flex_interactionwebhook_{:026}", s.created);
            let mut webhook = json!({
                "ttid": ttid, "account_sid": ACCOUNT, "instance_sid": INSTANCE,
                "webhook_url": field("WebhookUrl"), "webhook_events": events,
                "webhook_method": field("WebhookMethod").unwrap_or_else(|| "POST".into()),
                "type": field("Type").unwrap_or_else(|| "global".into()),
                "url": format!("https://flex-api.twilio.com{base}/{ttid}"),
            });
            if let Some(name) = field("FriendlyName") {
                webhook["friendly_name"] = json!(name);
            }
            s.webhooks.insert(ttid, webhook.clone());
            (201, webhook)
        }
        ("GET", "") => {
            let all: Vec<&Value> = s
                .webhooks
                .values()
                .filter(|w| query.get("Type").is_none_or(|t| w["type"] == *t))
                .collect();
            let page: usize = query.get("Page").and_then(|p| p.parse().ok()).unwrap_or(0);
            let size = 2;
            let data: Vec<&Value> = all.iter().skip(page * size).take(size).copied().collect();
            let next = ((page + 1) * size < all.len()).then(|| {
                format!(
                    "http://{addr}{base}?PageSize={size}&Page={}{}",
                    page + 1,
                    query
                        .get("Type")
                        .map(|t| format!("&Type={t}"))
                        .unwrap_or_default()
                )
            });
            (
                200,
                json!({"meta": {"page": page, "page_size": size, "next_page_url": next, "key": "data"}, "data": data}),
            )
        }
        (_, ttid) if !s.webhooks.contains_key(ttid) => {
            error(404, 20404, "The requested resource was not found")
        }
        ("GET", ttid) => (200, s.webhooks[ttid].clone()),
        ("POST", ttid) => {
            let webhook = s.webhooks.get_mut(ttid).unwrap();
            for (param, key) in [
                ("WebhookUrl", "webhook_url"),
                ("WebhookMethod", "webhook_method"),
                ("FriendlyName", "friendly_name"),
                ("Type", "type"),
            ] {
                if let Some(value) = field(param) {
                    webhook[key] = json!(value);
                }
            }
            if !events.is_empty() {
                webhook["webhook_events"] = json!(events);
            }
            (200, webhook.clone())
        }
        ("DELETE", ttid) => {
            s.webhooks.remove(ttid);
            (204, Value::Null)
        }
        _ => error(405, 20004, "Method not allowed"),
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json_out(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "{} {}",
        stdout(output),
        stderr(output)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(output)))
}

#[test]
fn create_list_get_update_delete_and_attach() {
    let flex = FakeFlex::start();
    let created = json_out(&flex.run(&[
        "webhooks",
        "--output",
        "json",
        "create",
        "--type",
        "interaction",
        "--url",
        "https://hooks.example.com/flex/interactions",
        "--event",
        "onChannelStatusUpdated",
        "--event",
        "onChannelCreateFailed",
        "--friendly-name",
        "bridge",
        "--connection-overrides",
        "rc=3&rp=5xx,ct,rt",
    ]));
    let ttid = created["ttid"].as_str().unwrap().to_owned();
    assert!(ttid.starts_with("flex_interactionwebhook_"));
    assert_eq!(
        created["webhook_url"],
        "https://hooks.example.com/flex/interactions#rc=3&rp=5xx,ct,rt"
    );
    // The form carried one WebhookEvents per event.
    let body = flex.state.lock().unwrap().log[0].2.clone();
    assert_eq!(body.matches("WebhookEvents=").count(), 2, "{body}");

    // Table output names the ttid and says how to attach an interaction webhook.
    let table = flex.run(&[
        "webhooks",
        "create",
        "--type",
        "interaction",
        "--url",
        "https://h.example/x",
        "--event",
        "onChannelCreated",
    ]);
    assert!(table.status.success(), "{}", stderr(&table));
    assert!(
        stdout(&table).contains("flex_interactionwebhook_")
            && stdout(&table).contains("attach-webhook"),
        "{}",
        stdout(&table)
    );

    for n in 0..3 {
        let out = flex.run(&[
            "webhooks",
            "create",
            "--url",
            &format!("https://h.example/{n}"),
            "--event",
            "onInteractionCreated",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // Five registrations over three pages of two.
    // Group options go after the subcommand too, as users type them.
    let all = json_out(&flex.run(&["webhooks", "list", "--output", "json"]));
    assert_eq!(all.as_array().unwrap().len(), 5, "{all}");
    let interaction_only = json_out(&flex.run(&[
        "webhooks",
        "--output",
        "json",
        "list",
        "--type",
        "interaction",
    ]));
    assert_eq!(interaction_only.as_array().unwrap().len(), 2);

    let got = json_out(&flex.run(&["webhooks", "get", &ttid, "--output", "json"]));
    assert_eq!(got["friendly_name"], "bridge", "{got}");
    let updated = json_out(&flex.run(&[
        "webhooks",
        "--output",
        "json",
        "update",
        &ttid,
        "--url",
        "https://new.example/flex",
    ]));
    assert_eq!(updated["webhook_url"], "https://new.example/flex");
    assert_eq!(
        updated["webhook_events"],
        json!(["onChannelStatusUpdated", "onChannelCreateFailed"]),
        "kept"
    );

    let attached = flex.run(&[
        "interactions",
        "attach-webhook",
        "--interaction",
        "KD0123456789abcdef0123456789abcdef",
        "--ttid",
        &ttid,
    ]);
    assert!(attached.status.success(), "{}", stderr(&attached));
    assert!(flex
        .state
        .lock()
        .unwrap()
        .log
        .iter()
        .any(|(m, p, b)| m == "POST"
            && p == "/v1/Interactions/KD0123456789abcdef0123456789abcdef"
            && b.contains(&ttid)));

    assert!(flex.run(&["webhooks", "delete", &ttid]).status.success());
    let missing = flex.run(&["webhooks", "get", &ttid]);
    assert_eq!(missing.status.code(), Some(4));
    assert!(
        stderr(&missing).contains("20404") && stderr(&missing).contains("hint:"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn errors_are_plain_and_busy_answers_are_retried() {
    let flex = FakeFlex::start();
    let denied = flex.run_as("wrong-token", &["webhooks", "list"]);
    assert_eq!(denied.status.code(), Some(3));
    let text = stderr(&denied);
    assert!(
        text.contains("20003") && text.contains("TWILIO_ACCOUNT_SID"),
        "{text}"
    );
    assert!(!text.contains("wrong-token"), "a secret was printed");

    // API key credentials take precedence over the Auth Token (the fake accepts only the
    // account's own, so a key is refused: proof it was the one sent).
    let with_key = Command::new(binary())
        .args(["webhooks", "list"])
        .env("FLEXBRIDGE_FLEX_API_URL", &flex.url)
        .env("TWILIO_ACCOUNT_SID", ACCOUNT)
        .env("TWILIO_AUTH_TOKEN", TOKEN)
        .env("TWILIO_API_KEY", "SK0123456789abcdef0123456789abcdef")
        .env("TWILIO_API_SECRET", "key-secret")
        .env("TWILIO_FLEX_INSTANCE_SID", INSTANCE)
        .output()
        .unwrap();
    assert_eq!(with_key.status.code(), Some(3), "{}", stderr(&with_key));
    assert!(!stderr(&with_key).contains("key-secret"));

    let unknown = flex.run(&[
        "webhooks",
        "create",
        "--url",
        "https://h.example/x",
        "--event",
        "onSomething",
    ]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        stderr(&unknown).contains("unknown event"),
        "{}",
        stderr(&unknown)
    );
    assert_eq!(flex.requests(), 0, "nothing sent for an invalid event");
    let allowed = flex.run(&[
        "webhooks",
        "create",
        "--url",
        "https://h.example/x",
        "--event",
        "onSomething",
        "--allow-unknown-event",
    ]);
    assert!(allowed.status.success(), "{}", stderr(&allowed));

    flex.state.lock().unwrap().busy_once = true;
    let started = std::time::Instant::now();
    let listed = json_out(&flex.run(&["webhooks", "--output", "json", "list"]));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "Retry-After was not honoured"
    );

    let unreachable = Command::new(binary())
        .args(["webhooks", "--base-url", "http://127.0.0.1:1", "list"])
        .env("TWILIO_ACCOUNT_SID", ACCOUNT)
        .env("TWILIO_AUTH_TOKEN", TOKEN)
        .env("TWILIO_FLEX_INSTANCE_SID", INSTANCE)
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(7));
    assert!(
        stderr(&unreachable).contains("cannot reach"),
        "{}",
        stderr(&unreachable)
    );
}

#[test]
fn ensure_creates_updates_leaves_alone_prunes_only_its_own_and_is_idempotent() {
    let flex = FakeFlex::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flexbridge.toml");
    let write = |body: &str| std::fs::write(&config, body).unwrap();
    let ensure = |extra: &[&str]| {
        let mut args = vec!["webhooks", "ensure", "--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = flex.run(&args);
        assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));
        stdout(&out)
    };
    // Someone else's registration: never touched.
    let other = flex.run(&[
        "webhooks",
        "create",
        "--url",
        "https://other.example/",
        "--event",
        "onChannelCreated",
        "--friendly-name",
        "analytics team",
    ]);
    assert!(other.status.success());

    write("[[webhooks]]\nname = \"all\"\nurl = \"https://hooks.example.com/flex/interactions\"\n\n[[webhooks]]\nname = \"status\"\nurl = \"https://hooks.example.com/flex/interactions\"\nevents = [\"onChannelStatusUpdated\"]\nconnection_overrides = \"rc=3&rp=5xx,ct,rt\"\n");
    let before = flex.requests();
    let plan = ensure(&["--dry-run"]);
    assert!(
        plan.contains("would create") && plan.contains("nothing was changed"),
        "{plan}"
    );
    assert_eq!(flex.webhooks().len(), 1, "--dry-run changed something");
    assert!(flex.state.lock().unwrap().log[before..]
        .iter()
        .all(|(m, _, _)| m == "GET"));

    let first = ensure(&[]);
    assert!(first.contains("2 change(s) made"), "{first}");
    assert_eq!(flex.webhooks().len(), 3);
    let status = flex
        .webhooks()
        .into_iter()
        .find(|w| w["friendly_name"] == "flexbridge:status")
        .unwrap();
    assert_eq!(
        status["webhook_url"],
        "https://hooks.example.com/flex/interactions#rc=3&rp=5xx,ct,rt"
    );
    assert_eq!(
        flex.webhooks()
            .into_iter()
            .find(|w| w["friendly_name"] == "flexbridge:all")
            .unwrap()["webhook_events"]
            .as_array()
            .unwrap()
            .len(),
        7
    );

    let second = ensure(&[]);
    assert!(
        second.contains("nothing to change"),
        "not idempotent: {second}"
    );

    // Drift: the URL changed in the file.
    write("[[webhooks]]\nname = \"all\"\nurl = \"https://hooks2.example.com/flex/interactions\"\n\n[[webhooks]]\nname = \"status\"\nurl = \"https://hooks.example.com/flex/interactions\"\nevents = [\"onChannelStatusUpdated\"]\nconnection_overrides = \"rc=3&rp=5xx,ct,rt\"\n");
    let third = ensure(&[]);
    assert!(
        third.contains("update") && third.contains("1 change(s) made"),
        "{third}"
    );
    assert!(flex
        .webhooks()
        .iter()
        .any(|w| w["webhook_url"] == "https://hooks2.example.com/flex/interactions"));

    // "status" leaves the file: without --prune it stays, with --prune only it goes.
    write("[[webhooks]]\nname = \"all\"\nurl = \"https://hooks2.example.com/flex/interactions\"\n");
    assert!(ensure(&[]).contains("nothing to change"));
    assert_eq!(flex.webhooks().len(), 3);
    let pruned = ensure(&["--prune"]);
    assert!(
        pruned.contains("delete") && pruned.contains("flexbridge:status"),
        "{pruned}"
    );
    let left: Vec<Value> = flex.webhooks();
    assert_eq!(left.len(), 2);
    assert!(
        left.iter().any(|w| w["friendly_name"] == "analytics team"),
        "someone else's webhook was pruned"
    );
    assert!(ensure(&["--prune"]).contains("nothing to change"));

    // An invalid file is refused before anything is sent.
    write("[[webhooks]]\nname = \"bad\"\nurl = \"ftp://x\"\nevents = [\"onNope\"]\n");
    let out = flex.run(&["webhooks", "ensure", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("webhooks[0].url") && stderr(&out).contains("onNope"),
        "{}",
        stderr(&out)
    );
}
