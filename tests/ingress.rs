//! End to end through the real binary: signed requests in every accepted form reach the file
//! sink; every kind of bad input is refused with its status, a log line and a metric, and
//! nothing is written.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use flexbridge_e2e::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const TOKEN: &str = "e2e-auth-token";
const PATH: &str = "/flex/interactions";

fn file_sink_config(extra: &str) -> String {
    format!(
        "{extra}\n[twilio]\nauth_tokens = [\"{TOKEN}\"]\n\n[[sinks]]\nname = \"archive\"\ntype = \"file\"\npath = \"{{dir}}/events.jsonl\"\n"
    )
}

#[test]
fn signed_form_get_and_json_requests_are_written_before_the_200() {
    let daemon = Daemon::start(&file_sink_config(""));
    let events_path = daemon.dir.path().join("events.jsonl");

    let form = signed_form(
        &daemon,
        PATH,
        TOKEN,
        &status_updated("KD0000000000000000000000000000000a", "closed"),
    )
    .header("I-Twilio-Idempotency-Token", "token-1")
    .send(daemon.ingress);
    assert_eq!(form.status, 200, "{}", form.text());
    // Acknowledged means already on disk.
    let written = read_events(&events_path);
    assert_eq!(written.len(), 1);
    assert_eq!(written[0]["id"], form.json()["id"]);
    assert_eq!(
        written[0]["type"],
        "com.twilio.flex.interactions.channel.status_updated"
    );
    assert_eq!(written[0]["data"]["channel_status"], "closed");
    assert!(form.header("x-request-id").is_some());

    let via_get = signed_get(
        &daemon,
        PATH,
        TOKEN,
        &status_updated("KD0000000000000000000000000000000b", "inactive"),
    )
    .send(daemon.ingress);
    assert_eq!(via_get.status, 200, "{}", via_get.text());

    let body = br#"{"EventType":"onChannelCreateFailed","AccountSid":"AC00000000000000000000000000000000","ErrorCode":45001,"ErrorMessage":"nope"}"#;
    let json = signed_json(&daemon, PATH, TOKEN, body).send(daemon.ingress);
    assert_eq!(json.status, 200, "{}", json.text());

    // The same delivery retried by Twilio (same idempotency token) keeps its id.
    let retry = signed_form(
        &daemon,
        PATH,
        TOKEN,
        &status_updated("KD0000000000000000000000000000000a", "closed"),
    )
    .header("I-Twilio-Idempotency-Token", "token-1")
    .send(daemon.ingress);
    assert_eq!(retry.json()["id"], form.json()["id"]);

    let written = read_events(&events_path);
    assert_eq!(written.len(), 4);
    assert_eq!(written[1]["data"]["channel_status"], "inactive");
    assert_eq!(written[2]["data"]["error_code"], 45001);
    assert!(written[2].get("subject").is_none());
    assert_eq!(
        daemon.metric("flexbridge_events_total{type=\"channel.status_updated\"}"),
        3.0
    );
    assert_eq!(
        daemon.metric("flexbridge_http_requests_total{status=\"200\"}"),
        4.0
    );
    assert_eq!(
        daemon.metric(
            "flexbridge_sink_publish_duration_seconds_count{outcome=\"success\",sink=\"archive\"}"
        ),
        4.0
    );
    assert_eq!(get(daemon.admin, "/readyz").status, 200);
    assert_eq!(get(daemon.admin, "/healthz").status, 200);
}

#[test]
fn shared_key_signatures_and_token_rotation_are_accepted() {
    let config = format!(
        "[twilio]\nauth_tokens = [\"old-token\", \"{TOKEN}\"]\n[twilio.shared_keys]\nwebhooks_sharedkey_01 = \"shared-secret\"\n\n[[sinks]]\nname = \"archive\"\ntype = \"file\"\npath = \"{{dir}}/events.jsonl\"\n"
    );
    let daemon = Daemon::start(&config);
    let p = status_updated("KD0000000000000000000000000000000c", "active");
    let signature = sign(
        Algorithm::HmacSha256,
        "shared-secret",
        &daemon.url(PATH),
        &p,
    );
    let mut req = signed_form(&daemon, PATH, TOKEN, &p);
    req.headers.retain(|(k, _)| k != "X-Twilio-Signature");
    let response = req
        .header("X-Twilio-Signature", &signature)
        .header(
            "X-Twilio-Webhooks-Signature-Settings",
            "key=webhooks_sharedkey_01,algorithm=HMAC_SHA256",
        )
        .send(daemon.ingress);
    assert_eq!(response.status, 200, "{}", response.text());
    // Signed with the second (rotated-in) token.
    assert_eq!(
        signed_form(&daemon, PATH, TOKEN, &p)
            .send(daemon.ingress)
            .status,
        200
    );
    assert_eq!(
        signed_form(&daemon, PATH, "old-token", &p)
            .send(daemon.ingress)
            .status,
        200
    );
}

/// Every bad input: the status, a log line naming the reason, the metric, nothing written.
#[test]
fn bad_inputs_are_refused_with_status_log_and_metric_and_nothing_is_written() {
    let config = file_sink_config("[ingress]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 2048\n")
        .replace(
            "[twilio]\n",
            "[twilio]\naccount_sids = [\"AC00000000000000000000000000000000\"]\n",
        );
    let daemon = Daemon::start(&config);
    let good = status_updated("KD0000000000000000000000000000000d", "active");
    let other_account: Vec<(String, String)> = good
        .iter()
        .map(|(k, v)| {
            let v = if k == "AccountSid" {
                "AC11111111111111111111111111111111".to_owned()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect();
    let without = |name: &str| -> Vec<(String, String)> {
        good.iter().filter(|(k, _)| k != name).cloned().collect()
    };
    let mut tampered = signed_form(&daemon, PATH, TOKEN, &good);
    tampered.body = form_encode(&status_updated(
        "KD0000000000000000000000000000000d",
        "closed",
    ))
    .into_bytes();
    let mut unsigned = signed_form(&daemon, PATH, TOKEN, &good);
    unsigned.headers.retain(|(k, _)| k != "X-Twilio-Signature");
    let mut bad_hash = signed_json(&daemon, PATH, TOKEN, br#"{"EventType":"onInteractionCreated","AccountSid":"AC00000000000000000000000000000000"}"#);
    bad_hash.body = br#"{"EventType":"onInteractionCreated","AccountSid":"AC00000000000000000000000000000001"}"#.to_vec();
    let malformed = {
        let mut r = signed_form(&daemon, PATH, TOKEN, &good);
        r.body = b"EventType=onInteractionCreated&AccountSid=%G1".to_vec();
        r
    };
    let bad_utf8 = {
        let mut r = signed_form(&daemon, PATH, TOKEN, &good);
        r.body = b"EventType=onInteractionCreated&AccountSid=%FF%FE".to_vec();
        r
    };
    let mut wrong_type = signed_form(&daemon, PATH, TOKEN, &good);
    wrong_type.headers[0].1 = "text/plain".into();
    let mut too_big = signed_form(&daemon, PATH, TOKEN, &good);
    too_big.body = vec![b'a'; 4096];
    let mut put = signed_form(&daemon, PATH, TOKEN, &good);
    put.method = "PUT";
    let mut elsewhere = signed_form(&daemon, PATH, TOKEN, &good);
    elsewhere.path = "/other".into();

    let cases: Vec<(&str, Req, u16, &str)> = vec![
        ("unsigned", unsigned, 403, "signature_missing"),
        ("tampered body", tampered, 403, "signature_mismatch"),
        (
            "signed with another token",
            signed_form(&daemon, PATH, "wrong-token", &good),
            403,
            "signature_mismatch",
        ),
        ("JSON body altered", bad_hash, 403, "body_hash_mismatch"),
        (
            "account not allowed",
            signed_form(&daemon, PATH, TOKEN, &other_account),
            403,
            "account_not_allowed",
        ),
        (
            "malformed percent-encoding",
            malformed,
            400,
            "malformed_encoding",
        ),
        ("invalid UTF-8", bad_utf8, 400, "invalid_utf8"),
        (
            "invalid JSON",
            signed_json(&daemon, PATH, TOKEN, b"[1,2"),
            400,
            "invalid_json",
        ),
        (
            "no EventType",
            signed_form(&daemon, PATH, TOKEN, &without("EventType")),
            400,
            "missing_event_type",
        ),
        (
            "no AccountSid",
            signed_form(&daemon, PATH, TOKEN, &without("AccountSid")),
            403,
            "account_not_allowed",
        ),
        ("wrong method", put, 405, "method_not_allowed"),
        ("unknown path", elsewhere, 404, "not_found"),
        (
            "unsupported content type",
            wrong_type,
            415,
            "unsupported_media_type",
        ),
        (
            "body over max_body_bytes",
            too_big,
            413,
            "payload_too_large",
        ),
    ];
    for (name, request, status, reason) in &cases {
        let response = request.send(daemon.ingress);
        assert_eq!(response.status, *status, "{name}: {}", response.text());
        assert_eq!(response.json()["error"], *reason, "{name}");
        daemon.wait_for_log(&format!("for {name}"), |l| l["reason"] == *reason);
        let verification = status == &403;
        let family = if verification {
            "flexbridge_verification_failures_total"
        } else {
            "flexbridge_http_rejections_total"
        };
        assert!(
            daemon.metric(&format!("{family}{{reason=\"{reason}\"}}")) >= 1.0,
            "{name}: metric"
        );
    }
    assert_eq!(
        daemon.metric("flexbridge_http_requests_total{status=\"500\"}"),
        0.0
    );
    assert_eq!(
        daemon.metric("flexbridge_http_requests_total{status=\"200\"}"),
        0.0
    );
    assert!(
        read_events(&daemon.dir.path().join("events.jsonl")).is_empty(),
        "nothing may be written"
    );

    // A wrong public URL is visible at once: the log names the URL variants tried.
    let line = daemon.wait_for_log("naming the URLs tried", |l| {
        l["reason"] == "signature_mismatch"
    });
    let error = line["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("http://{}{PATH}", daemon.ingress)),
        "{error}"
    );
    assert!(
        !daemon.logs().iter().any(|l| l.to_string().contains(TOKEN)),
        "a secret was logged"
    );

    // A missing AccountSid without an allow-list is a 400.
    let open = Daemon::start(&file_sink_config(""));
    let response = signed_form(&open, PATH, TOKEN, &without("AccountSid")).send(open.ingress);
    assert_eq!(response.status, 400);
    assert_eq!(response.json()["error"], "missing_account_sid");
}

#[test]
fn a_connection_that_does_not_send_its_headers_is_closed() {
    let daemon = Daemon::start(&file_sink_config(
        "[ingress]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"1s\"\n",
    ));
    let mut stream = TcpStream::connect(daemon.ingress).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"POST /flex/interactions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    // The server closes (possibly after a 408): read returns 0 or the response then 0.
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(5),
        "closed after {waited:?}, expected about 1 s"
    );
}

#[test]
fn a_body_that_does_not_arrive_gets_408_and_nothing_is_written() {
    let daemon = Daemon::start(&file_sink_config(
        "[ingress]\nlisten = \"127.0.0.1:0\"\nbody_read_timeout = \"1s\"\n",
    ));
    let request = signed_form(
        &daemon,
        PATH,
        TOKEN,
        &status_updated("KD00000000000000000000000000000011", "active"),
    )
    .bytes(daemon.ingress);
    let mut stream = TcpStream::connect(daemon.ingress).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&request[..request.len() - 10]).unwrap();
    let response = read_response(&mut stream);
    assert_eq!(response.status, 408, "{}", response.text());
    assert_eq!(response.json()["error"], "body_timeout");
    // The log line carries the request's id, as every line of a request does.
    let line = daemon.wait_for_log("for the timeout", |l| l["reason"] == "body_timeout");
    assert_eq!(
        line["span"]["request_id"].as_str(),
        response.header("x-request-id"),
        "{line}"
    );
    assert_eq!(
        daemon.metric("flexbridge_http_rejections_total{reason=\"body_timeout\"}"),
        1.0
    );
    assert!(read_events(&daemon.dir.path().join("events.jsonl")).is_empty());
}

#[test]
fn a_sink_that_cannot_write_gives_503_with_retry_after_and_nothing_acknowledged() {
    // /dev/full fails every write with ENOSPC: a real I/O fault, no mock.
    let config = format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nack_timeout = \"2s\"\nmax_attempts = 2\n\n[[sinks]]\nname = \"full\"\ntype = \"file\"\npath = \"/dev/full\"\n"
    );
    let daemon = Daemon::start(&config);
    let response = signed_form(
        &daemon,
        PATH,
        TOKEN,
        &status_updated("KD0000000000000000000000000000000e", "closed"),
    )
    .send(daemon.ingress);
    assert_eq!(response.status, 503, "{}", response.text());
    assert_eq!(response.header("retry-after"), Some("5"));
    assert_eq!(response.json()["error"], "sink_unavailable");
    let line = daemon.wait_for_log("at ERROR for the lost event", |l| {
        l["level"] == "ERROR" && l["reason"] == "sink_unavailable"
    });
    assert!(line["error"].as_str().unwrap().contains("full"), "{line}");
    // The line names the event an operator has to recover.
    assert_eq!(
        line["interaction_sid"], "KD0000000000000000000000000000000e",
        "{line}"
    );
    assert_eq!(
        line["ce_type"], "com.twilio.flex.interactions.channel.status_updated",
        "{line}"
    );
    assert_eq!(line["event_id"].as_str().map(str::len), Some(32), "{line}");
    assert_eq!(
        daemon.metric("flexbridge_sink_failures_total{reason=\"io\",sink=\"full\"}"),
        1.0
    );
    assert_eq!(
        daemon.metric("flexbridge_sink_retries_total{sink=\"full\"}"),
        1.0
    );
}

#[test]
fn refuses_to_start_without_a_secret_and_check_config_redacts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[ingress]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let output = std::process::Command::new(binary())
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("TWILIO_AUTH_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no secret to verify"), "{stderr}");

    let output = std::process::Command::new(binary())
        .args(["check-config", "--config"])
        .arg(&path)
        .env("TWILIO_AUTH_TOKEN", "very-secret-token")
        .env("FLEXBRIDGE__TWILIO__SHARED_KEYS__K1", "another-secret")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("**REDACTED**"), "{stdout}");
    assert!(
        !stdout.contains("very-secret-token") && !stdout.contains("another-secret"),
        "{stdout}"
    );
}

#[test]
fn disabled_verification_is_explicit_warned_and_labelled() {
    let daemon = Daemon::start(
        "[twilio]\nverify_signatures = false\n\n[[sinks]]\nname = \"archive\"\ntype = \"file\"\npath = \"{dir}/events.jsonl\"\n",
    );
    daemon.wait_for_log("warning that verification is off", |l| {
        l["level"] == "WARN" && l["message"].as_str().unwrap_or("").contains("DISABLED")
    });
    let unsigned = Req {
        method: "POST",
        path: PATH.into(),
        headers: vec![(
            "Content-Type".into(),
            "application/x-www-form-urlencoded; charset=utf-8".into(),
        )],
        body: form_encode(&status_updated(
            "KD0000000000000000000000000000000f",
            "active",
        ))
        .into_bytes(),
    };
    assert_eq!(unsigned.send(daemon.ingress).status, 200);
    let text = get(daemon.admin, "/metrics").text();
    assert!(
        text.contains("signature_verification=\"disabled\""),
        "{text}"
    );
}

/// A flood of forged signatures: every one is refused with 403 and counted, the answer does
/// not disclose the URLs tried (built from the client's Host header, they reveal
/// `public_url`), and the log gets at most a line a second per reason, with the count of
/// the others.
#[test]
fn a_flood_of_forged_signatures_is_counted_not_echoed_and_its_log_is_rate_limited() {
    let daemon = Daemon::start(&file_sink_config(
        "[ingress]\nlisten = \"127.0.0.1:0\"\npublic_url = \"https://hooks.secret-host.example\"\n",
    ));
    let started = Instant::now();
    let forged = 300;
    for n in 0..forged {
        let params = status_updated(&format!("KD{n:032x}"), "active");
        let response = signed_form(&daemon, PATH, "not-the-token", &params).send(daemon.ingress);
        assert_eq!(response.status, 403);
        let body = response.text();
        assert!(
            !body.contains("secret-host") && !body.contains("http"),
            "the answer discloses a URL: {body}"
        );
        assert_eq!(response.json()["error"], "signature_mismatch");
    }
    let elapsed = started.elapsed().as_secs() + 1;
    assert_eq!(
        daemon.metric("flexbridge_verification_failures_total{reason=\"signature_mismatch\"}"),
        forged as f64
    );
    // The first refusal is logged at once, with the URLs tried for the operator.
    let first = daemon.wait_for_log("the first refusal", |l| l["reason"] == "signature_mismatch");
    assert!(
        first["error"].as_str().unwrap().contains("secret-host"),
        "{first}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    // One more after a second carries the count of what was not logged.
    let params = status_updated("KD0000000000000000000000000000ffff", "active");
    signed_form(&daemon, PATH, "not-the-token", &params).send(daemon.ingress);
    let accounted = || {
        let lines: Vec<_> = daemon
            .logs()
            .into_iter()
            .filter(|l| l["reason"] == "signature_mismatch")
            .collect();
        let suppressed: u64 = lines.iter().filter_map(|l| l["suppressed"].as_u64()).sum();
        (lines.len() as u64, suppressed)
    };
    let waited = Instant::now();
    while accounted().0 + accounted().1 < forged + 1 && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (lines, suppressed) = accounted();
    assert!(
        lines <= elapsed + 2,
        "{lines} lines for {forged} forged requests in {elapsed} s"
    );
    assert_eq!(
        lines + suppressed,
        forged + 1,
        "every refusal is either logged or counted in `suppressed`"
    );
}

/// `curl` over TLS trusting `ca`: the HTTP status, or None when the handshake fails.
fn curl_tls(url: &str, ca: &std::path::Path, signature: &str, body: &str) -> Option<u16> {
    let output = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg("--cacert")
        .arg(ca)
        .args(["-H", &format!("X-Twilio-Signature: {signature}")])
        .args(["-H", "Content-Type: application/x-www-form-urlencoded"])
        .args(["--data-binary", body])
        .arg(url)
        .output()
        .expect("curl");
    let code: u16 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .ok()?;
    (code != 0).then_some(code)
}

/// The listener terminates TLS itself with a certificate from files, signs against the
/// https URL, and serves a renewed certificate without a restart.
#[test]
fn the_listener_terminates_tls_and_picks_up_a_renewed_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let first = flexbridge_testkit::test_pki(certs.path(), "first");
    let second = flexbridge_testkit::test_pki(certs.path(), "second");
    let (cert, key) = (certs.path().join("live.pem"), certs.path().join("live.key"));
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let daemon = Daemon::start(&file_sink_config(&format!(
        "[ingress]\nlisten = \"127.0.0.1:0\"\n[ingress.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nreload_interval = \"200ms\"\n",
        cert.display(),
        key.display()
    )));
    let url = format!("https://127.0.0.1:{}{PATH}", daemon.ingress.port());
    let send = |n: u32, ca: &std::path::Path| {
        let params = status_updated(&format!("KD{n:032x}"), "active");
        let signature = sign(Algorithm::HmacSha1, TOKEN, &url, &params);
        curl_tls(&url, ca, &signature, &form_encode(&params))
    };
    assert_eq!(send(1, &first.ca), Some(200));
    // Plain HTTP on the TLS port gets no answer.
    let mut plain = TcpStream::connect(daemon.ingress).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    plain
        .write_all(b"GET /flex/interactions HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/1.1 200"));

    // Renewal: new files in place; the next connections get the new certificate.
    std::thread::sleep(Duration::from_millis(1100)); // a distinct modification time
    std::fs::copy(&second.key, &key).unwrap();
    std::fs::copy(&second.cert, &cert).unwrap();
    let started = Instant::now();
    while send(2, &second.ca) != Some(200) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the renewed certificate is not served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        send(3, &first.ca),
        None,
        "the old certificate is still served"
    );
    daemon.wait_for_log("the reload", |l| {
        l["message"]
            .as_str()
            .unwrap_or("")
            .contains("serving the new certificate")
    });
    assert_eq!(
        read_events(&daemon.dir.path().join("events.jsonl")).len(),
        2
    );
}
