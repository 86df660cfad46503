#!/usr/bin/env python3
"""Lint and render the Helm chart with Helm's own engine (helm-python-sdk), validate every
rendered manifest against the Kubernetes schemas (kubernetes-validate, offline), and print
the manifests as JSON for the test suite (tests/helm.rs):

    scripts/helm_check.py CHART [VALUES.yaml ...]   -> {"values file": [manifest, ...], ...}
    scripts/helm_check.py CHART --expect-failure VALUES.yaml   -> {"error": "..."}

Each values file is rendered on its own, on top of the chart's defaults ("" = defaults only).
Resources of the Prometheus Operator (monitoring.coreos.com) have no schema in
kubernetes-validate and are checked by the test instead.
"""
import json
import sys

import kubernetes_validate
import yaml
from helm_python import Chart, lint

KUBE_VERSION = "1.30.0"


def render(chart_dir, values_file):
    values = {}
    if values_file:
        with open(values_file) as f:
            values = yaml.safe_load(f) or {}
    report = lint(chart_dir, values, strict=True, kube_version="v" + KUBE_VERSION)
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    if problems or report.get("errors"):
        raise SystemExit(f"helm lint {values_file or 'defaults'}: {problems} {report.get('errors')}")
    with Chart.load(chart_dir) as chart:
        files = chart.render(values, name="flexbridge", namespace="flex", is_install=True)
    manifests = []
    for name, text in sorted(files.items()):
        if not name.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            if not doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
                try:
                    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
                except Exception as e:  # the message names the field
                    raise SystemExit(f"{values_file or 'defaults'}: {name}: {doc.get('kind')}: {e}")
            doc["__template"] = name
            manifests.append(doc)
    return manifests


def main():
    args = sys.argv[1:]
    chart_dir = args.pop(0)
    if args and args[0] == "--expect-failure":
        try:
            render(chart_dir, args[1])
        except SystemExit as e:
            print(json.dumps({"error": str(e)}))
            return
        except Exception as e:
            print(json.dumps({"error": str(e)}))
            return
        raise SystemExit(f"{args[1]} rendered, but it should have failed")
    out = {}
    for values_file in args or [""]:
        out[values_file] = render(chart_dir, values_file)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
