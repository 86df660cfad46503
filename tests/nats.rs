//! The `nats` sink end to end: the real binary, signed webhooks and `flexbridge simulate`, read
//! back from the real JetStream stream.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use flexbridge_e2e::*;
use std::collections::HashSet;

const TOKEN: &str = "nats-e2e-token";
const PATH: &str = "/flex/interactions";

fn daemon_with_stream(stream: &str, prefix: &str) -> Daemon {
    Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n\n[[sinks]]\nname = \"jetstream\"\ntype = \"nats\"\nurl = \"{}\"\nsubject = \"{prefix}.{{account}}.{{event}}\"\n[sinks.stream]\nname = \"{stream}\"\nstorage = \"memory\"\nduplicate_window = \"5m\"\n",
        nats_url()
    ))
}

#[test]
fn simulated_traffic_every_200_has_its_message_in_the_stream() {
    let (stream, prefix) = (unique("FBE2E"), unique("fbe2e"));
    let daemon = daemon_with_stream(&stream, &prefix);
    wait_ready(&daemon);
    let summary = simulate(&daemon, PATH, TOKEN, 300, &["--concurrency", "16"]);
    assert_eq!(summary["status"]["200"], 300, "{summary}");
    drop(daemon);
    let messages = drain_stream(&stream);
    let ids: HashSet<&str> = messages.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(messages.len(), 300);
    assert_eq!(ids.len(), 300);
    assert!(messages
        .iter()
        .all(|(_, subject)| subject.starts_with(&format!("{prefix}.AC"))));
}

#[test]
fn the_same_signed_webhook_twice_gives_two_200s_and_one_message() {
    let (stream, prefix) = (unique("FBDUP"), unique("fbdup"));
    let daemon = daemon_with_stream(&stream, &prefix);
    wait_ready(&daemon);
    let webhook = status_updated("KD00000000000000000000000000000020", "closed");
    for _ in 0..2 {
        let response = signed_form(&daemon, PATH, TOKEN, &webhook)
            .header("I-Twilio-Idempotency-Token", "same-delivery")
            .send(daemon.ingress);
        assert_eq!(response.status, 200, "{}", response.text());
    }
    assert_eq!(
        daemon.metric("flexbridge_sink_duplicates_total{sink=\"jetstream\"}"),
        1.0
    );
    drop(daemon);
    assert_eq!(drain_stream(&stream).len(), 1);
}

#[test]
fn no_stream_for_the_subject_gives_503_a_clear_log_and_not_ready() {
    let daemon = Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n\n[[sinks]]\nname = \"jetstream\"\ntype = \"nats\"\nurl = \"{}\"\nsubject = \"{}.{{event}}\"\n",
        nats_url(),
        unique("fbnone")
    ));
    let response = signed_form(
        &daemon,
        PATH,
        TOKEN,
        &status_updated("KD00000000000000000000000000000021", "active"),
    )
    .send(daemon.ingress);
    assert_eq!(response.status, 503, "{}", response.text());
    let line = daemon.wait_for_log("about the missing stream", |l| {
        l["reason"] == "sink_unavailable"
    });
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains("no JetStream stream captures"),
        "{line}"
    );
    let ready = get(daemon.admin, "/readyz");
    assert_eq!(ready.status, 503);
    let body = ready.json();
    assert!(
        body["sinks"][0]["error"]
            .as_str()
            .unwrap()
            .contains("no JetStream stream captures subject"),
        "{body}"
    );
}

/// Confirm mode rides out a broker blip: every connection to NATS is cut for 2 s under steady
/// traffic; publishes are retried until `delivery.ack_timeout`, so no webhook gets a 503 and
/// every acknowledged event is in the stream.
#[test]
fn a_two_second_cut_in_confirm_mode_costs_no_503() {
    let (stream, prefix) = (unique("FBE2ECUT"), unique("fbe2ecut"));
    let proxy = Proxy::start(authority(&nats_url()));
    let daemon = Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nack_timeout = \"10s\"\n\n[[sinks]]\nname = \"jetstream\"\ntype = \"nats\"\nurl = \"nats://{}\"\nsubject = \"{prefix}.{{account}}.{{event}}\"\n[sinks.stream]\nname = \"{stream}\"\nstorage = \"memory\"\nduplicate_window = \"5m\"\n",
        proxy.addr()
    ));
    wait_ready(&daemon);
    let summary = traffic_through_cut(
        &daemon,
        PATH,
        TOKEN,
        &proxy,
        (std::time::Duration::from_secs(6), 100),
        (
            std::time::Duration::from_millis(1500),
            std::time::Duration::from_secs(2),
        ),
    );
    let sent = summary["sent"].as_u64().unwrap();
    assert!(sent >= 300, "{summary}");
    assert_eq!(summary["status"]["200"], sent, "{summary}");
    drop(daemon);
    let messages = drain_stream(&stream);
    let ids: HashSet<&str> = messages.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids.len() as u64,
        sent,
        "every acknowledged event is in the stream"
    );
}

/// Without `I-Twilio-Idempotency-Token`, two deliveries with identical parameters are two
/// events: two 200s, two distinct ids, two messages (JetStream's duplicate window on the id
/// must never swallow a distinct event while flexbridge answers 200).
#[test]
fn identical_deliveries_without_a_token_are_two_messages() {
    let (stream, prefix) = (unique("FBE2ENOTOKEN"), unique("fbe2enotoken"));
    let daemon = daemon_with_stream(&stream, &prefix);
    wait_ready(&daemon);
    let params = status_updated("KD000000000000000000000000000000e1", "closed");
    let first = signed_form(&daemon, PATH, TOKEN, &params).send(daemon.ingress);
    let second = signed_form(&daemon, PATH, TOKEN, &params).send(daemon.ingress);
    assert_eq!((first.status, second.status), (200, 200));
    assert_ne!(first.json()["id"], second.json()["id"]);
    drop(daemon);
    assert_eq!(drain_stream(&stream).len(), 2);
}
