//! The Helm chart, rendered by Helm's own engine (`helm-python-sdk`: lint --strict, render)
//! and validated offline against the Kubernetes schemas (`kubernetes-validate`), through
//! `scripts/helm_check.py`: the defaults and one values file per broker plus persistence.
//! Each rendered configuration passes `flexbridge check-config`; ports, probes and Service
//! agree with the configured listen addresses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flexbridge_e2e::binary;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR")))
        .join("..")
        .canonicalize()
        .unwrap()
}

const VALUES: &[&str] = &[
    "",
    "helm/flexbridge/ci/rabbitmq-values.yaml",
    "helm/flexbridge/ci/nats-values.yaml",
    "helm/flexbridge/ci/kafka-values.yaml",
    "helm/flexbridge/ci/spool-values.yaml",
];

/// Renders every values file; fails (never skips) when Python or its packages are missing:
/// `scripts/test.sh` installs them.
fn render_all() -> BTreeMap<String, Vec<Value>> {
    let output = Command::new("python3")
        .current_dir(root())
        .arg("scripts/helm_check.py")
        .arg("helm/flexbridge")
        .args(VALUES.iter().filter(|v| !v.is_empty()))
        .output()
        .expect("python3 (scripts/test.sh installs helm-python-sdk and kubernetes-validate)");
    assert!(
        output.status.success(),
        "helm_check.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut all: BTreeMap<String, Vec<Value>> =
        serde_json::from_slice(&output.stdout).expect("JSON from helm_check.py");
    // Defaults: rendered alone too, with no values file.
    let defaults = Command::new("python3")
        .current_dir(root())
        .args(["scripts/helm_check.py", "helm/flexbridge"])
        .output()
        .unwrap();
    assert!(
        defaults.status.success(),
        "{}",
        String::from_utf8_lossy(&defaults.stderr)
    );
    let defaults: BTreeMap<String, Vec<Value>> = serde_json::from_slice(&defaults.stdout).unwrap();
    all.extend(defaults);
    all
}

fn find<'a>(manifests: &'a [Value], kind: &str) -> Option<&'a Value> {
    manifests.iter().find(|m| m["kind"] == kind)
}

fn port_of(listen: &str) -> u64 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

/// The rendered daemon configuration as the pod gets it. `check-config` prints it back as
/// TOML, which the checks below read (no YAML parser needed here).
fn rendered_config(manifests: &[Value]) -> String {
    find(manifests, "ConfigMap").unwrap()["data"]["flexbridge.yaml"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn check_config(yaml: &str, env: &[(String, String)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flexbridge.yaml");
    std::fs::write(&path, yaml).unwrap();
    let output = Command::new(binary())
        .args(["check-config", "--config"])
        .arg(&path)
        .env_clear()
        .env("TWILIO_AUTH_TOKEN", "chart-test-token")
        .env("RABBITMQ_PASSWORD", "chart-rabbit-secret")
        .env("KAFKA_SASL_PASSWORD", "chart-kafka-secret")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "check-config refused the chart's config:\n{yaml}\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `listen = "host:port"` of a section in check-config's TOML.
fn listen_in(printed: &str, section: &str) -> u64 {
    let start = printed
        .find(&format!("[{section}]"))
        .unwrap_or_else(|| panic!("no [{section}] in {printed}"));
    let line = printed[start..]
        .lines()
        .find(|l| l.starts_with("listen = "))
        .unwrap();
    port_of(line.trim_start_matches("listen = ").trim_matches('"'))
}

/// Whole seconds of `5s`, `2m`, `500ms` (rounded up), as the chart computes them.
fn seconds(text: &str) -> u64 {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse::<u64>().unwrap().div_ceil(1000);
    }
    if let Some(s) = text.strip_suffix('s') {
        return s.parse().unwrap();
    }
    if let Some(m) = text.strip_suffix('m') {
        return m.parse::<u64>().unwrap() * 60;
    }
    panic!("duration {text}")
}

#[test]
fn the_chart_renders_valid_manifests_whose_ports_probes_and_config_agree() {
    let rendered = render_all();
    assert_eq!(rendered.len(), VALUES.len(), "{:?}", rendered.keys());
    let mut checksums = Vec::new();
    for (values, manifests) in &rendered {
        let label = if values.is_empty() {
            "defaults"
        } else {
            values.as_str()
        };
        let workload = manifests
            .iter()
            .find(|m| m["kind"] == "Deployment" || m["kind"] == "StatefulSet")
            .unwrap_or_else(|| panic!("{label}: no workload"));
        let pod = &workload["spec"]["template"]["spec"];
        let container = &pod["containers"][0];

        // The image defaults to the chart's appVersion.
        assert!(
            container["image"].as_str().unwrap().ends_with(":0.1.0"),
            "{label}: {}",
            container["image"]
        );
        // Hardened by default.
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{label}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"][0],
            "ALL"
        );
        assert!(container["resources"]["requests"].is_object());
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            assert_eq!(
                container[probe]["httpGet"]["port"], "admin",
                "{label}: {probe}"
            );
        }

        // The config the pod reads is valid, with the environment the pod gets.
        let yaml = rendered_config(manifests);
        assert!(!yaml.contains("chart-rabbit-secret") && !yaml.contains("chart-kafka-secret"));
        let env: Vec<(String, String)> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_owned(),
                    e["value"].as_str()?.to_owned(),
                ))
            })
            .collect();
        let printed = check_config(&yaml, &env);
        assert!(
            !printed.contains("chart-kafka-secret") && !printed.contains("chart-rabbit-secret")
        );

        // Container ports come from the listen addresses; probes and Service use them.
        let ports: BTreeMap<&str, u64> = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap(),
                    p["containerPort"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(ports["webhooks"], listen_in(&printed, "ingress"), "{label}");
        assert_eq!(ports["admin"], listen_in(&printed, "admin"), "{label}");
        let service = manifests
            .iter()
            .find(|m| m["kind"] == "Service" && m["spec"]["clusterIP"] != "None")
            .unwrap();
        for port in service["spec"]["ports"].as_array().unwrap() {
            let target = port["targetPort"].as_str().unwrap();
            assert!(
                ports.contains_key(target),
                "{label}: Service targets {target}"
            );
            if target == "admin" {
                assert_eq!(port["port"].as_u64(), Some(ports["admin"]), "{label}");
            }
        }

        // The pod outlives the daemon's own shutdown.
        let shutdown_key = |key: &str, default: u64| {
            printed
                .lines()
                .find(|l| l.starts_with(&format!("{key} = ")))
                .map_or(default, |l| seconds(l.split('"').nth(1).unwrap().trim()))
        };
        let spool = printed.contains("mode = \"spool\"");
        let needed = shutdown_key("readiness_delay", 0)
            + shutdown_key("grace_period", 20)
            + shutdown_key("drain_timeout", 10) * if spool { 2 } else { 1 };
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(grace > needed, "{label}: grace {grace} <= {needed}");

        // A config change rolls the pods.
        let checksum = workload["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(checksum.len(), 64, "{label}");
        checksums.push(checksum);

        assert!(find(manifests, "PodDisruptionBudget").is_some(), "{label}");
        assert!(find(manifests, "ServiceAccount").is_some(), "{label}");
        for m in manifests {
            assert_eq!(
                m["metadata"]["labels"]["app.kubernetes.io/name"], "flexbridge",
                "{label}: {} has no standard labels",
                m["kind"]
            );
        }
        if spool {
            // Spool mode needs its volume: a StatefulSet with a claim per pod, mounted where
            // the spool lives.
            assert_eq!(workload["kind"], "StatefulSet", "{label}");
            let claim = &workload["spec"]["volumeClaimTemplates"][0];
            assert_eq!(claim["metadata"]["name"], "data");
            let mount = container["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == "data")
                .unwrap();
            assert!(printed.contains(&format!(
                "dir = \"{}/",
                mount["mountPath"].as_str().unwrap()
            )));
        }
    }
    checksums.sort();
    checksums.dedup();
    assert!(
        checksums.len() >= 4,
        "the config checksum ignores the config"
    );

    // The rest of the options, switched on in the spool values.
    let all = &rendered["helm/flexbridge/ci/spool-values.yaml"];
    let service = all.iter().find(|m| m["kind"] == "Service").unwrap();
    let service_ports: Vec<&str> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let monitor = find(all, "ServiceMonitor").expect("ServiceMonitor");
    let monitor_port = monitor["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert!(service_ports.contains(&monitor_port), "{monitor_port}");
    let ingress = find(all, "Ingress").expect("Ingress");
    let backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]
        ["name"]
        .as_str()
        .unwrap();
    assert!(service_ports.contains(&backend), "{backend}");
    let rules = find(all, "PrometheusRule").expect("PrometheusRule");
    assert!(
        rules["spec"]["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .len()
            >= 5
    );
    let job = find(all, "Job").expect("the webhooks Job");
    assert_eq!(
        job["metadata"]["annotations"]["helm.sh/hook"],
        "post-install,post-upgrade"
    );
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["args"][1],
        "ensure"
    );
    let hpa = find(
        &rendered["helm/flexbridge/ci/kafka-values.yaml"],
        "HorizontalPodAutoscaler",
    );
    assert!(hpa.is_some(), "autoscaling.enabled renders an HPA");
    let deployment = find(
        &rendered["helm/flexbridge/ci/kafka-values.yaml"],
        "Deployment",
    )
    .unwrap();
    assert!(
        deployment["spec"]["replicas"].is_null(),
        "the HPA owns the replicas"
    );
}

/// The chart's copy of the alert rules is the one under deploy/.
#[test]
fn the_chart_ships_the_same_alert_rules_as_deploy() {
    let chart = std::fs::read(root().join("helm/flexbridge/files/flexbridge-alerts.yaml")).unwrap();
    let deploy = std::fs::read(root().join("deploy/prometheus/flexbridge-alerts.yaml")).unwrap();
    assert!(
        chart == deploy,
        "copy deploy/prometheus/flexbridge-alerts.yaml to helm/flexbridge/files/"
    );
}

/// Values that would break a pod fail at render time with the reason.
#[test]
fn values_that_cannot_work_are_refused_with_the_reason() {
    for (file, expected) in [
        (
            "tests/helm/spool-without-persistence.yaml",
            "set persistence.enabled=true",
        ),
        (
            "tests/helm/listen-without-port.yaml",
            "/config/admin/listen",
        ),
        ("tests/helm/schema-violation.yaml", "/replicaCount"),
    ] {
        let output = Command::new("python3")
            .current_dir(root())
            .args([
                "scripts/helm_check.py",
                "helm/flexbridge",
                "--expect-failure",
                file,
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        let error = report["error"].as_str().unwrap();
        assert!(error.contains(expected), "{file}: {error}");
    }
}
