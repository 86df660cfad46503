//! Signed, realistic Flex traffic against any URL: `flexbridge simulate`, `flexbridge demo`,
//! the load generator of our benchmarks and the HTTP client of the end-to-end tests. One
//! HTTP/1.1 connection per concurrency slot; each slot sends one interaction's events in
//! order, so per-interaction order holds at the receiver.

pub mod traffic;

use crate::traffic::{Params, Traffic};
use flexbridge_ingress::signature::{body_sha256, sign, Algorithm};
use hdrhistogram::Histogram;
use http::Uri;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Why traffic could not be sent or a response not be read.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// The target URL is not a usable `http://` URL.
    #[error("invalid URL {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting, writing or reading failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server closed the connection before a whole response.
    #[error("the server closed the connection")]
    Closed,
    /// The response is not HTTP/1.1 as we read it.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// A JSON body could not be encoded.
    #[error("encoding the JSON body")]
    Json(#[from] serde_json::Error),
    /// The latency histogram refused a value.
    #[error("latency histogram: {0}")]
    Histogram(String),
    /// A worker task panicked.
    #[error("a simulate worker panicked")]
    Worker(#[from] tokio::task::JoinError),
}

impl From<std::io::Error> for SimulateError {
    fn from(source: std::io::Error) -> Self {
        Self::Io {
            context: "I/O error".to_owned(),
            source,
        }
    }
}

type Result<T, E = SimulateError> = std::result::Result<T, E>;

/// How webhooks are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// POST with a form body (Twilio's default).
    Form,
    /// GET with the parameters in the query string.
    Get,
    /// POST with a JSON body and `bodySHA256` in the query.
    Json,
}

/// The key requests are signed with.
#[derive(Clone)]
pub enum Signer {
    /// No `X-Twilio-Signature` (to see a receiver refuse it).
    None,
    /// HMAC-SHA1 with an Auth Token.
    AuthToken(String),
    /// HMAC-SHA256 with a SharedKey: key id and secret.
    SharedKey(String, String),
}

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Target {
    /// The full URL, as signed.
    pub url: String,
    authority: String,
    path_and_query: String,
}

impl Target {
    /// Parses an `http://` URL.
    pub fn parse(url: &str) -> Result<Self> {
        let invalid = |reason: &str| SimulateError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid(
                "only http:// URLs are supported (put a TLS proxy in front for https)",
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| invalid("the URL has no host"))?
            .as_str()
            .rsplit('@')
            .next()
            .unwrap_or_default()
            .to_owned();
        let path_and_query = uri
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        Ok(Self {
            url: url.to_owned(),
            authority,
            path_and_query,
        })
    }

    fn connect_addr(&self) -> String {
        if self
            .authority
            .rsplit(':')
            .next()
            .is_some_and(|p| p.parse::<u16>().is_ok())
            && !self.authority.ends_with(']')
        {
            self.authority.clone()
        } else {
            format!("{}:80", self.authority)
        }
    }
}

/// A webhook as it goes on the wire, and what its signature covers.
struct Wire<'a> {
    method: &'static str,
    path: String,
    signed_url: String,
    signed_params: &'a [(String, String)],
    body: Vec<u8>,
    content_type: Option<&'static str>,
}

/// Writes one signed webhook request (HTTP/1.1, keep-alive) into `out`.
pub fn write_request(
    out: &mut Vec<u8>,
    target: &Target,
    encoding: Encoding,
    signer: &Signer,
    params: &Params,
    idempotency_token: &str,
) -> Result<()> {
    let sep = if target.path_and_query.contains('?') {
        '&'
    } else {
        '?'
    };
    let wire = match encoding {
        Encoding::Form => Wire {
            method: "POST",
            path: target.path_and_query.clone(),
            signed_url: target.url.clone(),
            signed_params: params,
            body: flexbridge_ingress::form::encode(params).into_bytes(),
            content_type: Some("application/x-www-form-urlencoded"),
        },
        Encoding::Get => {
            let query = flexbridge_ingress::form::encode(params);
            Wire {
                method: "GET",
                path: format!("{}{sep}{query}", target.path_and_query),
                signed_url: format!("{}{sep}{query}", target.url),
                signed_params: &[],
                body: Vec::new(),
                content_type: None,
            }
        }
        Encoding::Json => {
            let object: serde_json::Map<String, serde_json::Value> = params
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                .collect();
            let body = serde_json::to_vec(&object)?;
            let hash = format!("bodySHA256={}", body_sha256(&body));
            Wire {
                method: "POST",
                path: format!("{}{sep}{hash}", target.path_and_query),
                signed_url: format!("{}{sep}{hash}", target.url),
                signed_params: &[],
                body,
                content_type: Some("application/json"),
            }
        }
    };
    use std::io::Write as _;
    write!(
        out,
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: TwilioProxy/1.1 (flexbridge simulate)\r\nI-Twilio-Idempotency-Token: {idempotency_token}\r\n",
        wire.method, wire.path, target.authority
    )?;
    if let Some(content_type) = wire.content_type {
        write!(out, "Content-Type: {content_type}\r\n")?;
    }
    if wire.method == "POST" {
        write!(out, "Content-Length: {}\r\n", wire.body.len())?;
    }
    match signer {
        Signer::None => {}
        Signer::AuthToken(token) => {
            let signature = sign(
                Algorithm::HmacSha1,
                token,
                &wire.signed_url,
                wire.signed_params,
            );
            write!(out, "X-Twilio-Signature: {signature}\r\n")?;
        }
        Signer::SharedKey(id, secret) => {
            let signature = sign(
                Algorithm::HmacSha256,
                secret,
                &wire.signed_url,
                wire.signed_params,
            );
            write!(
                out,
                "X-Twilio-Signature: {signature}\r\nX-Twilio-Webhooks-Signature-Settings: key={id},algorithm=HMAC_SHA256\r\n"
            )?;
        }
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&wire.body);
    Ok(())
}

/// One keep-alive HTTP/1.1 connection, written to and read from directly: a load generator
/// must cost far less per request than the server it measures.
pub struct Connection {
    addr: String,
    stream: Option<TcpStream>,
    request: Vec<u8>,
    response: Vec<u8>,
}

/// A response: status, head and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The status line and headers, as received.
    pub head: Vec<u8>,
    /// The body (chunked encoding removed).
    pub body: Vec<u8>,
}

impl Answer {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(&self.head)
            .ok()?
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one whole response from a blocking stream (tests, tools).
pub fn read_answer(stream: &mut impl std::io::Read) -> Result<Answer> {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((answer, _, _)) = parse_response(&buffer)? {
            return Ok(answer);
        }
        let n = stream
            .read(&mut chunk)
            .map_err(|source| SimulateError::Io {
                context: "reading the response".to_owned(),
                source,
            })?;
        if n == 0 {
            return Err(SimulateError::Closed);
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

impl Connection {
    /// A connection to the target, opened on first use.
    pub fn new(target: &Target) -> Self {
        Self {
            addr: target.connect_addr(),
            stream: None,
            request: Vec::with_capacity(2048),
            response: Vec::with_capacity(4096),
        }
    }

    /// The buffer to write the next request into (see [`write_request`]).
    pub fn request_buffer(&mut self) -> &mut Vec<u8> {
        self.request.clear();
        &mut self.request
    }

    /// Sends the request in the buffer and reads the response. Reconnects when needed.
    pub async fn send(&mut self) -> Result<Answer> {
        let result = self.exchange().await;
        if result.as_ref().map_or(true, |(_, close)| *close) {
            self.stream = None;
        }
        result.map(|(answer, _)| answer)
    }

    async fn exchange(&mut self) -> Result<(Answer, bool)> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream =
                    TcpStream::connect(&self.addr)
                        .await
                        .map_err(|source| SimulateError::Io {
                            context: format!("cannot connect to {}", self.addr),
                            source,
                        })?;
                let _ = stream.set_nodelay(true);
                self.response.clear();
                self.stream.insert(stream)
            }
        };
        stream.write_all(&self.request).await?;
        loop {
            if let Some((answer, consumed, close)) = parse_response(&self.response)? {
                self.response.drain(..consumed);
                return Ok((answer, close));
            }
            self.response.reserve(4096);
            if stream.read_buf(&mut self.response).await? == 0 {
                return Err(SimulateError::Closed);
            }
        }
    }
}

/// A whole response at the start of `buffer`: the answer, the bytes it took, and whether the
/// server closes the connection. `None` while incomplete.
pub fn parse_response(buffer: &[u8]) -> Result<Option<(Answer, usize, bool)>> {
    let malformed = |what: &str| SimulateError::Malformed(what.to_owned());
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response
        .parse(buffer)
        .map_err(|e| malformed(&e.to_string()))?
    {
        httparse::Status::Complete(head) => head,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.unwrap_or(0);
    let mut length = None;
    let mut chunked = false;
    let mut close = false;
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| malformed("bad Content-Length"))?,
            );
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let rest = &buffer[head..];
    if chunked {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let Some(line_end) = rest[at..].windows(2).position(|w| w == b"\r\n") else {
                return Ok(None);
            };
            let size_text = std::str::from_utf8(&rest[at..at + line_end])
                .map_err(|_| malformed("bad chunk size"))?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| malformed("bad chunk size"))?;
            at += line_end + 2;
            if size == 0 {
                // Trailers, if any, end with an empty line.
                let Some(end) = rest[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some((
                        Answer {
                            status,
                            head: buffer[..head].to_vec(),
                            body,
                        },
                        head + at + 2,
                        close,
                    )));
                }
                let Some(end) = rest[at..].windows(4).position(|w| w == b"\r\n\r\n") else {
                    return Ok(None);
                };
                return Ok(Some((
                    Answer {
                        status,
                        head: buffer[..head].to_vec(),
                        body,
                    },
                    head + at + end + 4,
                    close,
                )));
            }
            if rest.len() < at + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
    }
    let length = length.unwrap_or(0);
    if rest.len() < length {
        return Ok(None);
    }
    let body = rest[..length].to_vec();
    Ok(Some((
        Answer {
            status,
            head: buffer[..head].to_vec(),
            body,
        },
        head + length,
        close,
    )))
}

/// What to send.
pub struct Options {
    /// The webhook URL (`http://`).
    pub url: String,
    /// The signing key.
    pub signer: Signer,
    /// Form POST, GET or JSON.
    pub encoding: Encoding,
    /// Stop after this many requests.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Requests per second in all; `None` is as fast as the receiver answers.
    pub rate: Option<f64>,
    /// Connections, each with one request in flight.
    pub concurrency: usize,
    /// Account SID for the traffic.
    pub account_sid: String,
    /// Flex instance SID for the traffic.
    pub instance_sid: String,
    /// Seed of the generator.
    pub seed: u64,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
}

/// The result of a run.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Requests that got an answer or failed.
    pub sent: u64,
    /// Wall time.
    pub elapsed_secs: f64,
    /// Requests per second.
    pub rate: f64,
    /// Count by HTTP status, and `error` for connection failures.
    pub status: BTreeMap<String, u64>,
    /// Latency percentiles in milliseconds.
    pub latency_ms: BTreeMap<String, f64>,
}

impl Summary {
    /// True when every request got a 2xx.
    pub fn all_ok(&self) -> bool {
        self.status
            .iter()
            .all(|(status, _)| status.starts_with('2'))
    }

    /// The summary for people.
    pub fn render(&self) -> String {
        let statuses = self
            .status
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let latency = ["p50", "p90", "p99", "max"]
            .iter()
            .map(|k| {
                format!(
                    "{k} {:.2} ms",
                    self.latency_ms.get(*k).copied().unwrap_or(0.0)
                )
            })
            .collect::<Vec<_>>()
            .join("  ");
        format!(
            "sent {} requests in {:.2} s ({:.0} req/s)\nstatus  {statuses}\nlatency {latency}\n",
            self.sent, self.elapsed_secs, self.rate
        )
    }
}

struct Worker {
    histogram: Histogram<u64>,
    status: BTreeMap<String, u64>,
}

/// Runs the traffic and returns the summary.
pub async fn run(options: Options) -> Result<Summary> {
    let target = Arc::new(Target::parse(&options.url)?);
    let concurrency = options.concurrency.max(1);
    let limit = options.count.unwrap_or(if options.duration.is_some() {
        u64::MAX
    } else {
        100
    });
    let progress = if options.progress {
        let bar = match options.count {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} {per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let claimed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = options.duration.map(|d| started + d);
    let mut tasks = Vec::with_capacity(concurrency);
    for slot in 0..concurrency {
        let target = Arc::clone(&target);
        let claimed = Arc::clone(&claimed);
        let progress = progress.clone();
        let signer = options.signer.clone();
        let encoding = options.encoding;
        let rate = options.rate;
        let mut traffic = Traffic::new(
            options.account_sid.clone(),
            options.instance_sid.clone(),
            options.seed.wrapping_add(slot as u64),
        );
        tasks.push(tokio::spawn(async move {
            let mut worker = Worker {
                histogram: Histogram::new(3)
                    .map_err(|e| SimulateError::Histogram(e.to_string()))?,
                status: BTreeMap::new(),
            };
            let mut connection = Connection::new(&target);
            let mut pending: std::vec::IntoIter<Params> = Vec::new().into_iter();
            loop {
                let seq = claimed.fetch_add(1, Ordering::Relaxed);
                if seq >= limit || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if let Some(rate) = rate.filter(|r| *r > 0.0) {
                    let due = started + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let params = match pending.next() {
                    Some(p) => p,
                    None => {
                        pending = traffic.lifecycle().into_iter();
                        match pending.next() {
                            Some(p) => p,
                            None => break,
                        }
                    }
                };
                let token = traffic.sid("idem-");
                write_request(
                    connection.request_buffer(),
                    &target,
                    encoding,
                    &signer,
                    &params,
                    &token,
                )?;
                let sent = Instant::now();
                let label = match connection.send().await {
                    Ok(answer) => answer.status.to_string(),
                    Err(error) => {
                        tracing::debug!(%error, "request failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        "error".to_owned()
                    }
                };
                let micros = sent.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
                let _ = worker.histogram.record(micros.max(1));
                *worker.status.entry(label).or_default() += 1;
                progress.inc(1);
            }
            Ok::<_, SimulateError>(worker)
        }));
    }
    let mut histogram =
        Histogram::<u64>::new(3).map_err(|e| SimulateError::Histogram(e.to_string()))?;
    let mut status = BTreeMap::new();
    for task in tasks {
        let worker = task.await??;
        histogram
            .add(&worker.histogram)
            .map_err(|e| SimulateError::Histogram(e.to_string()))?;
        for (s, n) in worker.status {
            *status.entry(s).or_default() += n;
        }
    }
    progress.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    let sent = histogram.len();
    let mut latency_ms = BTreeMap::new();
    for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
        latency_ms.insert(
            name.to_owned(),
            histogram.value_at_quantile(q) as f64 / 1000.0,
        );
    }
    latency_ms.insert("max".to_owned(), histogram.max() as f64 / 1000.0);
    Ok(Summary {
        sent,
        elapsed_secs: elapsed,
        rate: if elapsed > 0.0 {
            sent as f64 / elapsed
        } else {
            0.0
        },
        status,
        latency_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_length_chunks_and_close() {
        let (a, used, close) =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}next")
                .unwrap()
                .unwrap();
        assert_eq!(
            (a.status, a.body.as_slice(), used, close),
            (200, &b"{}"[..], 40, false)
        );
        let chunked = b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let (a, used, close) = parse_response(chunked).unwrap().unwrap();
        assert_eq!(
            (a.status, a.body.as_slice(), used, close),
            (503, &b"abcde"[..], chunked.len(), true)
        );
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
                .unwrap()
                .is_none()
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nConte")
            .unwrap()
            .is_none());
    }

    #[test]
    fn targets_parse() {
        let t = Target::parse("http://127.0.0.1:8080/flex/interactions?x=1").unwrap();
        assert_eq!(t.connect_addr(), "127.0.0.1:8080");
        assert_eq!(t.path_and_query, "/flex/interactions?x=1");
        assert_eq!(
            Target::parse("http://localhost/x").unwrap().connect_addr(),
            "localhost:80"
        );
        assert!(Target::parse("https://example.com/x").is_err());
    }
}
