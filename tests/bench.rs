//! The bench's arithmetic (`scripts/bench_results.py`, `scripts/bench_plot.py`), on figures
//! made up for it: a machine that runs at half speed during one of three rounds must not
//! change a ratio, because each ratio divides figures measured next to each other (a row by
//! the bare hyper probes just before and after it, a broker row by its plain client in the
//! same round), and the median over the rounds is taken after the division.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// Runs a script of the repository with python3; fails (never skips) when it fails or Python
/// is missing (`scripts/test.sh` installs matplotlib for `bench_plot.py`).
fn python(args: &[OsString]) {
    let output = Command::new("python3")
        .current_dir(root())
        .args(args)
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{:?} failed:\n{}",
        args.first(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The load generator's `--json-summary` for `rate` requests a second over 10 s.
fn summary(rate: f64, p99: f64) -> String {
    json!({"sent": (rate * 10.0) as u64, "elapsed_secs": 10.0, "rate": rate,
           "status": {"200": (rate * 10.0) as u64}, "latency_ms": {"p50": p99 / 4.0, "p99": p99}})
    .to_string()
}

/// One entry as bench.sh passes it: round|row|full|half|cpu ticks|events|rss|probe|probe ticks.
/// `speed` scales every rate (and the CPU time per event inversely), as a slower host would.
fn entry(round: u32, row: &str, rate: f64, speed: f64) -> String {
    let rate = rate * speed;
    let events = rate * 10.0;
    // 20 µs per event at full speed: ticks of 10 ms.
    let cpu_ticks = events * 20e-6 / speed / 0.01;
    let probe = summary(100_000.0 * speed, 1.0);
    // 7 µs per request at full speed, over the 10 s summary's requests.
    let probe_ticks = 100_000.0 * speed * 10.0 * 7e-6 / speed / 0.01;
    format!(
        "{round}|{row}|{}|{}|{cpu_ticks}|{events}|20480|{probe}|{probe_ticks}",
        summary(rate, 8.0),
        summary(rate / 2.0, 4.0)
    )
}

#[test]
fn every_ratio_is_taken_within_its_round_and_the_median_follows() {
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.json");
    // Round 2 on a host at half speed. RabbitMQ over its ceiling: 0.90, 0.80 and 0.944 in
    // the three rounds (median 0.90), where the ratio of the medians would be 8.5k/9k = 0.944.
    // Kafka at its plain client's rate in every round (1.00), first in each round.
    let entries = [
        entry(1, "kafka", 30_000.0, 1.0),
        entry(1, "ceiling-kafka", 30_000.0, 1.0),
        entry(1, "file", 50_000.0, 1.0),
        entry(1, "rabbitmq", 9_000.0, 1.0),
        entry(1, "ceiling-rabbitmq", 10_000.0, 1.0),
        entry(2, "kafka", 30_000.0, 0.5),
        entry(2, "ceiling-kafka", 30_000.0, 0.5),
        entry(2, "file", 50_000.0, 0.5),
        entry(2, "rabbitmq", 8_000.0, 0.5),
        entry(2, "ceiling-rabbitmq", 10_000.0, 0.5),
        entry(3, "kafka", 30_000.0, 1.0),
        entry(3, "ceiling-kafka", 30_000.0, 1.0),
        entry(3, "file", 50_000.0, 1.0),
        entry(3, "rabbitmq", 8_500.0, 1.0),
        entry(3, "ceiling-rabbitmq", 9_000.0, 1.0),
    ];
    let mut args: Vec<OsString> = vec!["scripts/bench_results.py".into(), results.clone().into()];
    args.push(summary(100_000.0, 1.0).into());
    args.extend(["2100", "100", "64", "10s", "5"].map(OsString::from));
    // The probe after the last row.
    args.push(format!("{}|700", summary(100_000.0, 1.0)).into());
    args.extend(entries.map(OsString::from));
    python(&args);
    let doc: Value = serde_json::from_slice(&std::fs::read(&results).unwrap()).unwrap();
    assert_eq!(doc["settings"]["rounds"], 3);
    let row = |name: &str| {
        doc["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["row"] == name)
            .unwrap()
            .clone()
    };
    let close = |value: &Value, expected: f64| {
        let value = value.as_f64().unwrap();
        assert!((value - expected).abs() < 1e-3, "{value} != {expected}");
    };
    let file = row("file");
    // Half the rate in round 2, but so was the probe before it: 0.50 in every round.
    close(&file["x_bare"], 0.5);
    close(&file["range"]["x_bare"][0], 0.5);
    close(&file["range"]["x_bare"][1], 0.5);
    close(&file["rate"], 50_000.0);
    close(&file["range"]["rate"][0], 25_000.0);
    close(&file["cpu_us"], 20.0);
    close(&file["bare_before_cpu_us"], 7.0);
    assert_eq!(file["rounds"].as_array().unwrap().len(), 3);
    let rabbitmq = row("rabbitmq");
    close(&rabbitmq["x_ceiling"], 0.9);
    close(&rabbitmq["range"]["x_ceiling"][0], 0.8);
    close(&rabbitmq["range"]["x_ceiling"][1], 8_500.0 / 9_000.0);
    close(&rabbitmq["p99_x_ceiling"], 1.0);
    // The last row of round 1 had the probe at full speed before it and the one at half
    // speed (round 2's first) after it: it is compared with their mean.
    close(
        &row("ceiling-rabbitmq")["rounds"][0]["x_bare"],
        10_000.0 / 75_000.0,
    );
    // The plain client has no RSS or status of flexbridge's.
    assert!(row("ceiling-rabbitmq").get("rss_mib").is_none());
    close(&row("kafka")["x_ceiling"], 1.0);
    // Bare hyper: the median of the fifteen probes, five of them at half speed.
    close(&doc["bare"]["rate"], 100_000.0);
    close(&doc["bare"]["range"]["rate"][0], 50_000.0);

    // The judged targets read the medians of the ratios, with their range.
    let plots = dir.path().join("plots");
    python(&[
        "scripts/bench_plot.py".into(),
        results.into(),
        plots.clone().into(),
    ]);
    let targets = std::fs::read_to_string(plots.join("targets.md")).unwrap();
    assert!(
        targets
            .contains("| rabbitmq rate × its plain client's | 0.90 x (0.80-0.94) | ≥ 0.85 | met |"),
        "{targets}"
    );
    assert!(
        targets.contains("| file rate × bare | 0.50 x (0.50-0.50) | ≥ 0.65 | **not met** |"),
        "{targets}"
    );
    // A sink's targets name its plain client's figures beside its own.
    assert!(
        targets.contains("| kafka rate | 30,000 req/s (15,000-30,000) | ≥ 30,000 | met |")
            && targets.contains("| plain client 30,000 msg/s |"),
        "{targets}"
    );
    assert!(
        targets.contains(
            "| kafka p99 at half load | 4.0 ms (4.0-4.0) | ≤ 5.0 | met |  |  | plain client at half its load: 4.0 ms |"
        ),
        "{targets}"
    );
    assert!(targets.contains("the machine's speed changed"), "{targets}");
    let table = std::fs::read_to_string(plots.join("table.md")).unwrap();
    assert!(
        table.contains("| file | 50,000 (25,000-50,000) | 0.50 (0.50-0.50) |"),
        "{table}"
    );
    for plot in ["throughput.png", "latency.png", "cpu.png"] {
        assert!(plots.join(plot).metadata().unwrap().len() > 1000, "{plot}");
    }
}
