#!/usr/bin/env python3
"""The figures of a bench run (scripts/bench.sh): prints them and writes results.json.

Usage: bench_results.py OUT.json REFERENCE REFERENCE_TICKS CLK_TCK CONNECTIONS DURATION DELAY_MS
                        LAST_PROBE ENTRY...
where REFERENCE is the load generator's JSON summary of the opening bare hyper run, each ENTRY
(in the order they ran) is "round|row|full|half|cpu ticks|events|rss KiB|probe|probe ticks":
the load generator's (or the plain client's) summaries at full and half load, the CPU time and
events counted over the full-load run, the peak RSS, and the bare hyper probe run just before
the row; LAST_PROBE is "probe|probe ticks" of the probe after the last row.

A VM's host can change its speed for minutes, so no ratio here divides by a figure measured
far away in time: a row's "x_bare" divides by the mean of the probes just before and just
after it, and a broker row's "x_ceiling" by its plain client's ceiling in the same round.
With several rounds each figure is the median over the rounds (ratios are taken within a
round first), with its range.
"""
import json
import os
import platform
import statistics
import sys
import time

# Figures that get a range over the rounds as well as their median.
RANGED = ("rate", "x_bare", "x_ceiling", "p99_x_ceiling", "cpu_us", "half_p99_ms", "bare_before_x")


def per_round(fields, tck):
    """One row of one round and the bare hyper probe just before it (its "x_bare" needs the
    probe after it too, so main() adds it)."""
    rnd, name, full, half, cpu, events, rss, probe, probe_ticks = fields
    full, half, probe = json.loads(full), json.loads(half), json.loads(probe)
    cpu, events = float(cpu), float(events)
    entry = {
        "round": int(rnd), "row": name, "rate": full["rate"],
        "p50_ms": full["latency_ms"]["p50"], "p99_ms": full["latency_ms"]["p99"],
        "half_rate": half["rate"], "half_p50_ms": half["latency_ms"]["p50"], "half_p99_ms": half["latency_ms"]["p99"],
        "bare_before": probe["rate"], "bare_before_cpu_us": float(probe_ticks) / tck / probe["sent"] * 1e6,
        "bare_before_p50_ms": probe["latency_ms"]["p50"], "bare_before_p99_ms": probe["latency_ms"]["p99"],
    }
    if events:
        entry["cpu_us"] = cpu / tck / events * 1e6
    if not name.startswith("ceiling-"):
        entry.update({"rss_mib": float(rss) / 1024, "status": full["status"], "events": int(events)})
    return entry


def median_row(entries):
    """The median of every figure over the rounds, the ranges, and the rounds themselves."""
    row = {"row": entries[0]["row"]}
    for key, value in entries[0].items():
        if key in ("round", "row", "status") or not all(key in e for e in entries):
            continue
        if isinstance(value, (int, float)):
            row[key] = statistics.median(e[key] for e in entries)
    if "status" in entries[0]:
        status = {}
        for e in entries:
            for code, n in e["status"].items():
                status[code] = status.get(code, 0) + n
        row["status"] = status
    row["range"] = {k: [min(e[k] for e in entries), max(e[k] for e in entries)]
                    for k in RANGED if all(k in e for e in entries)}
    if len(entries) > 1:
        row["rounds"] = entries
    return row


def main():
    out, reference, reference_ticks, tck, conc, duration, delay, last_probe = sys.argv[1:9]
    reference, tck = json.loads(reference), float(tck)
    entries = [per_round(arg.split("|"), tck) for arg in sys.argv[9:]]
    # The probe after each row is the next row's, or the last one.
    afters = [e["bare_before"] for e in entries[1:]] + [json.loads(last_probe.split("|")[0])["rate"]]
    for e, after in zip(entries, afters):
        e["bare_after"] = after
        e["x_bare"] = e["rate"] / ((e["bare_before"] + after) / 2)
    # A broker row over its plain client's ceiling of the same round, rate and p99.
    ceilings = {(e["round"], e["row"].split("-", 1)[1]): e for e in entries if e["row"].startswith("ceiling-")}
    for e in entries:
        ceiling = ceilings.get((e["round"], e["row"]))
        if ceiling:
            e["x_ceiling"] = e["rate"] / ceiling["rate"]
            e["p99_x_ceiling"] = e["p99_ms"] / ceiling["p99_ms"]
    # Bare hyper: the median of every probe (one before each row of each round).
    bare = {"rate": statistics.median(e["bare_before"] for e in entries),
            "cpu_us": statistics.median(e["bare_before_cpu_us"] for e in entries),
            "p50_ms": statistics.median(e["bare_before_p50_ms"] for e in entries),
            "p99_ms": statistics.median(e["bare_before_p99_ms"] for e in entries),
            "range": {"rate": [min(e["bare_before"] for e in entries), max(e["bare_before"] for e in entries)]},
            "probes": len(entries)} if entries else {}
    for e in entries:
        e["bare_before_x"] = e["bare_before"] / bare["rate"]
    names = list(dict.fromkeys(e["row"] for e in entries))
    rows = [median_row([e for e in entries if e["row"] == name]) for name in names]
    rounds = max((e["round"] for e in entries), default=1)
    reference_us = float(reference_ticks) / tck / reference["sent"] * 1e6
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
    mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    doc = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model, "memory_gib": round(mem_kib / 2**20, 1),
                    "kernel": platform.release(), "note": "load generator, brokers and flexbridge share these cores"},
        "settings": {"connections": int(conc), "duration": duration, "proxy_delay_ms": int(delay), "rounds": rounds},
        "reference": {"rate": reference["rate"], "p50_ms": reference["latency_ms"]["p50"],
                      "p99_ms": reference["latency_ms"]["p99"], "cpu_us": reference_us},
        "bare": bare,
        "rows": rows,
    }
    report(doc)
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"results: {out}")


def span(row, key, fmt):
    """" (low-high)" over the rounds, or nothing with one round."""
    low, high = row.get("range", {}).get(key, (None, None))
    return f" ({fmt(low)}-{fmt(high)})" if low is not None and low != high else ""


def report(doc):
    lat = lambda p50, p99: f"p50 {p50:.2f} ms  p99 {p99:.2f} ms"
    bare, ref = doc["bare"], doc["reference"]
    rounds = doc["settings"]["rounds"]
    print(f"{doc['settings']['connections']} connections; load generator, brokers and daemon on this machine; "
          f"{rounds} round{'s' if rounds > 1 else ''}, medians over the rounds (range)")
    print(f"bare hyper, opening reference: {ref['rate']:.0f} req/s, {ref['cpu_us']:.1f} us CPU per request")
    if bare:
        print(f"bare hyper, median of {bare['probes']} probes (one before each row): {bare['rate']:.0f} req/s"
              f"{span(bare, 'rate', lambda v: f'{v:.0f}')}, {bare['cpu_us']:.1f} us CPU per request")
    for row in doc["rows"]:
        name = row["row"]
        rate = f"{row['rate']:.0f}{span(row, 'rate', lambda v: f'{v:.0f}')}"
        x_bare = f"{row['x_bare']:.2f}x{span(row, 'x_bare', lambda v: f'{v:.2f}')} bare hyper probed before and after it"
        cpu = (f"{row['cpu_us']:.1f} us{span(row, 'cpu_us', lambda v: f'{v:.1f}')}" if "cpu_us" in row else "n/a")
        if name.startswith("ceiling-"):
            print(f"{name} (plain client, no HTTP): {rate} msg/s  {lat(row['p50_ms'], row['p99_ms'])}  client CPU per message {cpu}")
            print(f"  half load: {row['half_rate']:.0f} msg/s  {lat(row['half_p50_ms'], row['half_p99_ms'])}")
            continue
        extra = (f", {row['x_ceiling']:.2f}x{span(row, 'x_ceiling', lambda v: f'{v:.2f}')} the broker's ceiling"
                 if "x_ceiling" in row else "")
        print(f"{name}:")
        print(f"  full load: {rate} req/s ({x_bare}{extra})  {lat(row['p50_ms'], row['p99_ms'])}  status {row['status']}")
        print(f"  half load: {row['half_rate']:.0f} req/s  {lat(row['half_p50_ms'], row['half_p99_ms'])}")
        print(f"  CPU per event: {cpu} (bare hyper {row['bare_before_cpu_us']:.1f} us per request)  "
              f"peak RSS {row['rss_mib']:.1f} MiB  events counted: {int(row['events'])}")


if __name__ == "__main__":
    main()
