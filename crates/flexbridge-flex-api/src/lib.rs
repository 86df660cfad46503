//! A typed client for the Flex `InteractionWebhooks` API (`/v1/Instances/{GO}/InteractionWebhooks`)
//! and for attaching a webhook to an Interaction (`POST /v1/Interactions/{KD}`). No official
//! helper library or OpenAPI spec covers these endpoints: this follows Twilio's document.
//! Requests are form-encoded with HTTP Basic auth; responses are parsed leniently (unknown
//! fields ignored, the documented typos accepted). 429 and 503 are retried, honouring
//! `Retry-After`, a bounded number of times.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use flexbridge_core::Secret;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// The seven documented Interactions event names, from core's table of event kinds.
pub const EVENTS: [&str; 7] = flexbridge_core::event::TWILIO_EVENT_TYPES;

/// `global` or `interaction`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookType {
    /// Every subscribed event of the Flex instance.
    #[default]
    Global,
    /// Only Interactions created or updated with this webhook's ttid.
    Interaction,
}

impl WebhookType {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::Interaction => "interaction",
        }
    }
}

/// What a webhook registration should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSpec {
    /// `Type`.
    pub kind: WebhookType,
    /// `WebhookUrl` (with any `#rc=...` connection overrides).
    pub url: String,
    /// `WebhookMethod`: `POST` or `GET`.
    pub method: String,
    /// `WebhookEvents`, one parameter each.
    pub events: Vec<String>,
    /// `FriendlyName`.
    pub friendly_name: Option<String>,
}

/// A registration as Twilio returns it. Every field is optional: the documented examples are
/// inconsistent, and unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    /// `flex_interactionwebhook_...`.
    #[serde(default)]
    pub ttid: String,
    /// Account SID.
    #[serde(default)]
    pub account_sid: Option<String>,
    /// Flex instance SID.
    #[serde(default)]
    pub instance_sid: Option<String>,
    /// The registered URL.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Subscribed events (the document's fetch example spells it `webhook_eventsfilters`).
    #[serde(default, alias = "webhook_eventsfilters")]
    pub webhook_events: Vec<String>,
    /// `POST` or `GET`.
    #[serde(default)]
    pub webhook_method: Option<String>,
    /// `global` or `interaction`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Friendly name.
    #[serde(default)]
    pub friendly_name: Option<String>,
    /// The resource URL (malformed in some documented examples; informational only).
    #[serde(default)]
    pub url: Option<String>,
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    data: Vec<Webhook>,
    #[serde(default)]
    meta: Meta,
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    next_page_url: Option<String>,
}

/// Twilio's error body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ApiError {
    /// Twilio error code.
    #[serde(default)]
    pub code: Option<i64>,
    /// Message.
    #[serde(default)]
    pub message: Option<String>,
    /// Documentation link.
    #[serde(default)]
    pub more_info: Option<String>,
    /// HTTP status.
    #[serde(default)]
    pub status: Option<u16>,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum FlexError {
    /// Twilio answered with an error.
    #[error("{}", render_api_error(*.status, .error))]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// Twilio's error body.
        error: ApiError,
    },
    /// The request did not reach Twilio or the answer did not come back.
    #[error("cannot reach {url}: {message}")]
    Network {
        /// The URL called.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// No answer within the timeout.
    #[error("{url} did not answer within {timeout:?}")]
    Timeout {
        /// The URL called.
        url: String,
        /// The limit.
        timeout: Duration,
    },
    /// The answer was not the JSON the API documents.
    #[error("unexpected answer from {url}: {message}")]
    Decode {
        /// The URL called.
        url: String,
        /// The parse error.
        message: String,
    },
    /// Invalid arguments (base URL, SID).
    #[error("{0}")]
    Invalid(String),
}

fn render_api_error(status: StatusCode, error: &ApiError) -> String {
    let mut text = format!("Twilio answered {status}");
    if let Some(code) = error.code {
        text.push_str(&format!(", error {code}"));
    }
    if let Some(message) = &error.message {
        text.push_str(&format!(": {message}"));
    }
    if let Some(more) = &error.more_info {
        text.push_str(&format!(" ({more})"));
    }
    text
}

/// HTTP Basic credentials: Account SID + Auth Token, or API key SID + secret.
#[derive(Clone)]
pub struct Credentials {
    /// Account SID or API key SID.
    pub username: String,
    /// Auth Token or API key secret.
    pub password: Secret,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

type HttpClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// The Flex API client.
pub struct FlexClient {
    base: String,
    authorization: HeaderValue,
    http: HttpClient,
    timeout: Duration,
    /// Retries of a 429 or 503 before giving up.
    pub max_retries: u32,
    /// Longest single wait for `Retry-After`.
    pub max_retry_wait: Duration,
}

impl FlexClient {
    /// A client for `base` (e.g. `https://flex-api.twilio.com`).
    pub fn new(base: &str, credentials: &Credentials) -> Result<Self, FlexError> {
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(FlexError::Invalid(format!(
                "--base-url {base:?} must start with https:// or http://"
            )));
        }
        let token = BASE64.encode(format!(
            "{}:{}",
            credentials.username,
            credentials.password.expose()
        ));
        let mut authorization = HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| {
            FlexError::Invalid("the credentials contain invalid characters".to_owned())
        })?;
        authorization.set_sensitive(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            base,
            authorization,
            http: Client::builder(TokioExecutor::new()).build(connector),
            timeout: Duration::from_secs(30),
            max_retries: 3,
            max_retry_wait: Duration::from_secs(30),
        })
    }

    fn webhooks_url(&self, instance: &str) -> String {
        format!("{}/v1/Instances/{instance}/InteractionWebhooks", self.base)
    }

    /// Registers a webhook.
    pub async fn create_webhook(
        &self,
        instance: &str,
        spec: &WebhookSpec,
    ) -> Result<Webhook, FlexError> {
        let url = self.webhooks_url(instance);
        self.json(Method::POST, &url, Some(form(spec))).await
    }

    /// Every registration, following `next_page_url` to the end.
    pub async fn list_webhooks(
        &self,
        instance: &str,
        kind: Option<WebhookType>,
    ) -> Result<Vec<Webhook>, FlexError> {
        let mut url = self.webhooks_url(instance);
        if let Some(kind) = kind {
            url.push_str(&format!("?Type={}", kind.as_str()));
        }
        let mut all = Vec::new();
        let mut next = Some(url);
        while let Some(url) = next.take() {
            let page: Page = self.json(Method::GET, &url, None).await?;
            all.extend(page.data);
            next = page.meta.next_page_url.filter(|u| !u.is_empty());
            if let Some(next_url) = &next {
                // Stay on the configured base (proxies, tests): keep only the path and query.
                if let Some(path) = path_of(next_url) {
                    next = Some(format!("{}{path}", self.base));
                }
            }
        }
        Ok(all)
    }

    /// One registration.
    pub async fn get_webhook(&self, instance: &str, ttid: &str) -> Result<Webhook, FlexError> {
        self.json(
            Method::GET,
            &format!("{}/{ttid}", self.webhooks_url(instance)),
            None,
        )
        .await
    }

    /// Changes a registration.
    pub async fn update_webhook(
        &self,
        instance: &str,
        ttid: &str,
        spec: &WebhookSpec,
    ) -> Result<Webhook, FlexError> {
        self.json(
            Method::POST,
            &format!("{}/{ttid}", self.webhooks_url(instance)),
            Some(form(spec)),
        )
        .await
    }

    /// Deletes a registration.
    pub async fn delete_webhook(&self, instance: &str, ttid: &str) -> Result<(), FlexError> {
        self.call(
            Method::DELETE,
            &format!("{}/{ttid}", self.webhooks_url(instance)),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Attaches an `interaction` webhook to an Interaction (`WebhookTtid`).
    pub async fn attach_webhook(
        &self,
        interaction: &str,
        ttid: &str,
    ) -> Result<serde_json::Value, FlexError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("WebhookTtid", ttid)
            .finish();
        self.json(
            Method::POST,
            &format!("{}/v1/Interactions/{interaction}", self.base),
            Some(body),
        )
        .await
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<String>,
    ) -> Result<T, FlexError> {
        let bytes = self.call(method, url, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| FlexError::Decode {
            url: url.to_owned(),
            message: e.to_string(),
        })
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<String>,
    ) -> Result<Bytes, FlexError> {
        let mut attempt = 0;
        loop {
            let mut request = Request::builder()
                .method(method.clone())
                .uri(url)
                .header(header::AUTHORIZATION, self.authorization.clone())
                .header(header::ACCEPT, "application/json")
                .header(
                    header::USER_AGENT,
                    concat!("flexbridge/", env!("CARGO_PKG_VERSION")),
                );
            if body.is_some() {
                request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            }
            let request = request
                .body(Full::new(Bytes::from(body.clone().unwrap_or_default())))
                .map_err(|e| FlexError::Invalid(format!("invalid request to {url}: {e}")))?;
            let response =
                match tokio::time::timeout(self.timeout, self.http.request(request)).await {
                    Err(_) => {
                        return Err(FlexError::Timeout {
                            url: url.to_owned(),
                            timeout: self.timeout,
                        })
                    }
                    Ok(Err(e)) => {
                        return Err(FlexError::Network {
                            url: url.to_owned(),
                            message: error_chain(&e),
                        })
                    }
                    Ok(Ok(response)) => response,
                };
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes =
                match tokio::time::timeout(self.timeout, response.into_body().collect()).await {
                    Err(_) => {
                        return Err(FlexError::Timeout {
                            url: url.to_owned(),
                            timeout: self.timeout,
                        })
                    }
                    Ok(Err(e)) => {
                        return Err(FlexError::Network {
                            url: url.to_owned(),
                            message: e.to_string(),
                        })
                    }
                    Ok(Ok(collected)) => collected.to_bytes(),
                };
            if status.is_success() {
                return Ok(bytes);
            }
            if matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            ) && attempt < self.max_retries
            {
                attempt += 1;
                let wait = retry_after
                    .unwrap_or(Duration::from_millis(500 * u64::from(attempt)))
                    .min(self.max_retry_wait);
                tracing::warn!(%status, attempt, wait = ?wait, "Twilio is busy; retrying");
                tokio::time::sleep(wait).await;
                continue;
            }
            let error = serde_json::from_slice(&bytes).unwrap_or_else(|_| ApiError {
                message: Some(String::from_utf8_lossy(&bytes).chars().take(300).collect()),
                ..ApiError::default()
            });
            return Err(FlexError::Api { status, error });
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn path_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    rest.find('/').map(|i| &rest[i..])
}

fn form(spec: &WebhookSpec) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("Type", spec.kind.as_str());
    form.append_pair("WebhookUrl", &spec.url);
    form.append_pair("WebhookMethod", &spec.method);
    for event in &spec.events {
        form.append_pair("WebhookEvents", event);
    }
    if let Some(name) = &spec.friendly_name {
        form.append_pair("FriendlyName", name);
    }
    form.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_examples_leniently() {
        let fetched = r#"{"ttid": "flex_interactionwebhook_x", "account_sid": "AC1", "webhook_eventsfilters": ["onChannelStatusUpdated"],
            "webhook_method": "POST", "type": "global", "url": "https://flex-api.twilio.com/Interactions/Webhooks)/x", "new_field": 1}"#;
        let w: Webhook = serde_json::from_str(fetched).unwrap();
        assert_eq!(w.webhook_events, vec!["onChannelStatusUpdated"]);
        assert_eq!(w.kind.as_deref(), Some("global"));
    }

    #[test]
    fn forms_repeat_webhook_events() {
        let body = form(&WebhookSpec {
            kind: WebhookType::Interaction,
            url: "https://h.example/flex#rc=3&rp=5xx".into(),
            method: "POST".into(),
            events: vec!["onChannelCreated".into(), "onChannelStatusUpdated".into()],
            friendly_name: Some("a b".into()),
        });
        assert_eq!(
            body,
            "Type=interaction&WebhookUrl=https%3A%2F%2Fh.example%2Fflex%23rc%3D3%26rp%3D5xx&WebhookMethod=POST&WebhookEvents=onChannelCreated&WebhookEvents=onChannelStatusUpdated&FriendlyName=a+b"
        );
    }

    #[test]
    fn errors_show_twilios_code_message_and_link() {
        let e = FlexError::Api {
            status: StatusCode::NOT_FOUND,
            error: ApiError {
                code: Some(20404),
                message: Some("not found".into()),
                more_info: Some("https://www.twilio.com/docs/errors/20404".into()),
                status: Some(404),
            },
        };
        let text = e.to_string();
        assert_eq!(
            text,
            "Twilio answered 404 Not Found, error 20404: not found (https://www.twilio.com/docs/errors/20404)"
        );
        let creds = Credentials {
            username: "AC1".into(),
            password: Secret::new("tok"),
        };
        assert!(!format!("{creds:?}").contains("tok"));
    }
}
