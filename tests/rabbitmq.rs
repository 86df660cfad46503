//! The `rabbitmq` sink end to end: the real binary, signed webhooks and `flexbridge simulate`,
//! read back from a real RabbitMQ queue.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use flexbridge_e2e::*;
use std::collections::HashSet;

const TOKEN: &str = "rabbit-e2e-token";
const PATH: &str = "/flex/interactions";

fn daemon(exchange: &str, queues: &str) -> Daemon {
    Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nack_timeout = \"3s\"\n\n[[sinks]]\nname = \"rabbit\"\ntype = \"rabbitmq\"\nuri = \"{}\"\nexchange = \"{exchange}\"\nrouting_key = \"flex.{{event}}\"\n[sinks.declare]\nexchange_type = \"topic\"\ndurable = false\n{queues}",
        amqp_url()
    ))
}

#[test]
fn simulated_traffic_every_200_has_its_message_in_the_queue() {
    let (exchange, queue) = (unique("fbe2e.ex."), unique("fbe2e.q."));
    let d = daemon(&exchange, &format!("[[sinks.declare.queues]]\nname = \"{queue}\"\ndurable = false\nbindings = [\"flex.#\"]\n"));
    let summary = simulate(&d, PATH, TOKEN, 300, &["--concurrency", "16"]);
    assert_eq!(summary["status"]["200"], 300, "{summary}");
    drop(d);
    let ids = drain_and_delete(&exchange, &queue);
    assert_eq!(ids.len(), 300);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 300);
}

#[test]
fn an_unroutable_event_gets_503_and_is_logged() {
    let exchange = unique("fbe2e.unroutable.");
    let d = daemon(&exchange, "");
    let response = signed_form(
        &d,
        PATH,
        TOKEN,
        &status_updated("KD00000000000000000000000000000030", "closed"),
    )
    .send(d.ingress);
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(response.header("retry-after").is_some());
    let line = d.wait_for_log("for the returned message", |l| {
        l["reason"] == "sink_unavailable"
    });
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains("no queue is bound"),
        "{line}"
    );
    assert_eq!(
        d.metric("flexbridge_sink_returned_total{sink=\"rabbit\"}"),
        1.0
    );
    drop(d);
    drain_and_delete(&exchange, "");
}

#[test]
fn a_broker_nack_gets_503() {
    let (exchange, queue) = (unique("fbe2e.nack."), unique("fbe2e.nackq."));
    let d = daemon(
        &exchange,
        &format!("[[sinks.declare.queues]]\nname = \"{queue}\"\ndurable = false\n[sinks.declare.queues.arguments]\nx-max-length = 1\nx-overflow = \"reject-publish\"\n"),
    );
    let first = signed_form(
        &d,
        PATH,
        TOKEN,
        &status_updated("KD00000000000000000000000000000031", "active"),
    )
    .send(d.ingress);
    assert_eq!(first.status, 200, "{}", first.text());
    let second = signed_form(
        &d,
        PATH,
        TOKEN,
        &status_updated("KD00000000000000000000000000000032", "active"),
    )
    .send(d.ingress);
    assert_eq!(second.status, 503, "{}", second.text());
    assert!(d.metric("flexbridge_sink_failures_total{reason=\"nack\",sink=\"rabbit\"}") >= 1.0);
    drop(d);
    assert_eq!(
        drain_and_delete(&exchange, &queue),
        vec![first.json()["id"].as_str().unwrap().to_owned()]
    );
}

/// Confirm mode rides out a broker blip: every connection to RabbitMQ is cut for 2 s under
/// steady traffic, the sink fails fast while it reconnects, and the shared retry layer keeps
/// trying until `delivery.ack_timeout`: no webhook gets a 503, and every acknowledged event is
/// in the queue.
#[test]
fn a_two_second_cut_in_confirm_mode_costs_no_503() {
    let (exchange, queue) = (unique("fbe2e.cut."), unique("fbe2e.cutq."));
    let proxy = Proxy::start(authority(&amqp_url()));
    let uri = amqp_url().replace(authority(&amqp_url()), &proxy.addr());
    let d = Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nack_timeout = \"10s\"\n\n[[sinks]]\nname = \"rabbit\"\ntype = \"rabbitmq\"\nuri = \"{uri}\"\nexchange = \"{exchange}\"\nrouting_key = \"flex.{{event}}\"\n[sinks.declare]\nexchange_type = \"topic\"\ndurable = false\n[[sinks.declare.queues]]\nname = \"{queue}\"\ndurable = false\nbindings = [\"flex.#\"]\n"
    ));
    wait_ready(&d);
    let sent = confirm_through_a_short_cut(&d, PATH, TOKEN, &proxy);
    assert!(d.metric("flexbridge_sink_retries_total{sink=\"rabbit\"}") > 0.0);
    drop(d);
    let ids = drain_and_delete(&exchange, &queue);
    // At least once: a publish whose confirm was lost in the cut may be stored twice.
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len() as u64,
        sent,
        "every acknowledged event is in the queue"
    );
}

/// Overload: with 300 ms added to every broker answer, 64 connections keep far more requests
/// waiting than `max_in_flight = 8` admits. The rest are answered 503 + `Retry-After` at once,
/// nothing is cut, every 200 is in the queue, and memory stays small. Connections over
/// `max_connections` get a 503 too.
#[test]
fn overload_is_shed_with_fast_503s_and_bounded_memory() {
    let (exchange, queue) = (unique("fbe2e.shed."), unique("fbe2e.shedq."));
    let proxy = Proxy::start(authority(&amqp_url()));
    let uri = amqp_url().replace(authority(&amqp_url()), &proxy.addr());
    let d = Daemon::start(&format!(
        "[ingress]\nlisten = \"127.0.0.1:0\"\nmax_in_flight = 8\nmax_connections = 80\n[twilio]\nauth_tokens = [\"{TOKEN}\"]\n\n[[sinks]]\nname = \"rabbit\"\ntype = \"rabbitmq\"\nuri = \"{uri}\"\nexchange = \"{exchange}\"\nrouting_key = \"flex.{{event}}\"\n[sinks.declare]\nexchange_type = \"topic\"\ndurable = false\n[[sinks.declare.queues]]\nname = \"{queue}\"\ndurable = false\nbindings = [\"flex.#\"]\n"
    ));
    wait_ready(&d);
    proxy
        .tcp()
        .delay_responses(std::time::Duration::from_millis(300));
    let summary = simulate_with(
        &d.url(PATH),
        TOKEN,
        &["--duration", "3s", "--concurrency", "64"],
    );
    let ok = summary["status"]["200"].as_u64().unwrap_or(0);
    let shed = summary["status"]["503"].as_u64().unwrap_or(0);
    assert!(ok > 0 && shed > ok, "{summary}");
    assert_eq!(ok + shed, summary["sent"].as_u64().unwrap(), "{summary}");
    assert_eq!(
        d.metric("flexbridge_http_rejections_total{reason=\"overloaded\"}"),
        shed as f64
    );
    // Admitted requests wait about one broker delay; a shed one does not wait at all, so the
    // median (a shed request) stays far below the delay.
    assert!(
        summary["latency_ms"]["p50"].as_f64().unwrap() < 100.0,
        "{summary}"
    );
    let line = d.wait_for_log("for shedding", |l| l["reason"] == "overloaded");
    assert_eq!(line["level"], "WARN");
    // Connections over the cap are refused with a whole 503 answer.
    let idle: Vec<_> = (0..80)
        .map(|_| std::net::TcpStream::connect(d.ingress).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut extra = std::net::TcpStream::connect(d.ingress).unwrap();
    let refused = read_response(&mut extra);
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(refused.text().contains("too_many_connections"));
    drop(idle);
    let rss = d.peak_rss_kib();
    assert!(rss < 64 * 1024, "peak RSS {rss} KiB");
    drop(d);
    let ids = drain_and_delete(&exchange, &queue);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len() as u64, ok);
}

/// A real RabbitMQ restart under steady traffic, on a node of the test's own (the shared
/// broker must not restart under the other tests): `rabbitmqctl stop_app` closes every
/// connection and refuses new ones for 3 s, then `start_app` brings the durable queue back
/// with its persistent messages. In spool mode every webhook gets 200; in confirm mode the
/// retries ride it out within `ack_timeout`. Either way every event is in the queue after.
#[test]
fn a_real_rabbitmq_restart_under_traffic_loses_nothing_in_spool_mode() {
    real_rabbitmq_restart("spool");
}

#[test]
fn a_real_rabbitmq_restart_under_traffic_costs_no_503_in_confirm_mode() {
    real_rabbitmq_restart("confirm");
}

fn real_rabbitmq_restart(mode: &str) {
    let node = flexbridge_testkit::RabbitNode::start(None);
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", node.port);
    let (exchange, queue) = (unique("fbe2e.restart."), unique("fbe2e.restartq."));
    let spool = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "[twilio]\nauth_tokens = [\"{TOKEN}\"]\n[delivery]\nmode = \"{mode}\"\nack_timeout = \"10s\"\n[spool]\ndir = \"{}\"\n\n[[sinks]]\nname = \"rabbit\"\ntype = \"rabbitmq\"\nuri = \"{url}\"\nexchange = \"{exchange}\"\nrouting_key = \"flex.{{event}}\"\n[sinks.declare]\nexchange_type = \"topic\"\ndurable = true\n[[sinks.declare.queues]]\nname = \"{queue}\"\ndurable = true\nbindings = [\"flex.#\"]\n",
        spool.path().display()
    ));
    wait_ready(&d);
    let sent = traffic_through_restart(&d, PATH, TOKEN, |up| {
        node.ctl(&[if up { "start_app" } else { "stop_app" }])
    });
    if mode == "confirm" {
        assert!(d.metric("flexbridge_sink_retries_total{sink=\"rabbit\"}") > 0.0);
    } else {
        wait_delivered(&d, "rabbit", std::time::Duration::from_secs(60));
    }
    drop(d);
    let ids = drain_and_delete_at(&url, &exchange, &queue);
    // At least once: a publish whose confirm was lost in the restart may be stored twice.
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len() as u64,
        sent,
        "every acknowledged event is in the queue"
    );
}
