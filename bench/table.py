#!/usr/bin/env python3
"""The comparison table of a bench/compare.sh run, from the JSON it left in OUT.

    python3 bench/table.py OUT RUNS "SERVERS" TLS SESSIONS CHAT_USERS CHAT_RATE FIND_START

bench/compare.sh calls it at the end of a run; calling it again re-renders
the table of an earlier run.
"""
import json, os, statistics, sys
out, runs, servers, tls, sessions, users, rate, start = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), *sys.argv[4:]
def load(server, kind):
    # A scenario that failed on a server left no file: its cell says n/a.
    # The floor's files have no server in their name.
    prefix = f"{server}-{kind}" if server else kind
    paths = [f"{out}/{prefix}-{n}.json" for n in range(1, runs + 1)]
    return [json.load(open(p)) for p in paths if os.path.exists(p)]
def at_max(report, key):
    # The figure of the find-max step at the highest sustained rate.
    steps = [s for s in report["steps"] if s["target_rate"] == report["max_sustained_rate"]]
    return steps[0].get(key) if steps else None
metrics = [
    ("KiB per idle session", "connections", lambda r: r["server_kib_per_session"], "lower"),
    ("sessions held", "connections", lambda r: r["sessions"], "higher"),
    ("logins/s while ramping", "connections", lambda r: r["logins_per_second"], "higher"),
    (f"chat p50 ms at {rate} msg/s", "chat", lambda r: r["latency_ms_p50"], "lower"),
    (f"chat p99 ms at {rate} msg/s", "chat", lambda r: r["latency_ms_p99"], "lower"),
    (f"server CPU µs/msg at {rate} msg/s", "chat", lambda r: r["server_cpu_us_per_message"], "lower"),
    (f"bench CPU µs/msg at {rate} msg/s", "chat", lambda r: r.get("bench_cpu_us_per_message"), "lower"),
    ("chat messages lost", "chat", lambda r: r["lost"], "lower"),
    ("highest msg/s, p99 <= 100 ms, no loss", "findmax", lambda r: r["max_sustained_rate"], "higher"),
    ("server CPU µs/msg at that rate", "findmax", lambda r: at_max(r, "server_cpu_us_per_message"), "lower"),
    ("bench CPU µs/msg at that rate", "findmax", lambda r: at_max(r, "bench_cpu_us_per_message"), "lower"),
    ("login-storm logins/s", "storm", lambda r: r["logins_per_second"], "higher"),
    ("server CPU ms/login", "storm", lambda r: r["server_cpu_ms_per_login"], "lower"),
    ("bench CPU ms/login", "storm", lambda r: r.get("bench_cpu_ms_per_login"), "lower"),
    ("presence p99 ms", "presence", lambda r: r["latency_ms_p99"], "lower"),
    ("server CPU µs/presence delivered", "presence", lambda r: r["server_cpu_us_per_delivery"], "lower"),
    ("presences lost", "presence", lambda r: r["lost"], "lower"),
    (f"WebSocket chat p99 ms at {rate} msg/s", "websocket", lambda r: r["latency_ms_p99"], "lower"),
    (f"WebSocket server CPU µs/msg", "websocket", lambda r: r["server_cpu_us_per_message"], "lower"),
    ("WebSocket messages lost", "websocket", lambda r: r["lost"], "lower"),
]
def cell(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, "n/a"
    m = statistics.median(values)
    def fmt(v):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return m, f"{fmt(m)} ({fmt(min(values))}–{fmt(max(values))})"
peers = [s for s in servers if s != "rookery"]
def header(title):
    head = [title] + servers + ([f"rookery/{p}" for p in peers] if "rookery" in servers else [])
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
def row(label, values, none=lambda server: "n/a"):
    # values: server -> the figures of its runs; a cell per server, then the
    # ratios. none(server): the cell of a server whose runs gave no figure.
    medians, cells = {}, []
    for server in servers:
        medians[server], text = cell(values(server))
        cells.append(none(server) if medians[server] is None else text)
    if "rookery" in servers:
        for p in peers:
            a, b = medians["rookery"], medians[p]
            cells.append(f"{a / b:.2f}" if a is not None and b else "n/a")
    print(f"| {label} | " + " | ".join(cells) + " |")
header("figure (median (min–max) of %d runs; TLS %s, %s sessions, %s chat users)" % (runs, tls, sessions, users))
for label, kind, get, better in metrics:
    if not any(load(server, kind) for server in servers):
        continue  # a scenario this run left out
    # A search whose first step already failed found no rate: below its start.
    none = (lambda server: f"below {start}" if load(server, kind) else "n/a") if label.startswith("highest") else (lambda server: "n/a")
    row(f"{label} ({better} is better)", lambda server: [get(r) for r in load(server, kind)], none)
# The p99 at each rate find-max stepped through (the same rates on every
# server; a server whose search stopped lower has no cell there).
p99_at = {server: {} for server in servers}
for server in servers:
    for report in load(server, "findmax"):
        for step in report["steps"]:
            p99_at[server].setdefault(step["target_rate"], []).append(step["latency_ms_p99"])
shared = lambda rate: sum(rate in p99_at[s] for s in servers) >= min(2, len(servers))
rates = sorted({r for s in servers for r in p99_at[s] if shared(r)})
if rates:
    print()
    header("find-max step msg/s: chat p99 ms, median (min–max)")
    for step in rates:
        row(str(step), lambda server: p99_at[server].get(step, []))
# The machine's floor at the chat rate (no server): what no server's chat
# latency at that rate can go below on this machine in this window.
floor = load(None, "floor")
if floor:
    print()
    print(f"| the machine's floor at {rate} msg/s (bare relay, plain TCP, no XML; median (min–max) of {len(floor)} runs) | ms |")
    print("| --- | --- |")
    for label, key in [("p50", "latency_ms_p50"), ("p99", "latency_ms_p99")]:
        print(f"| {label} | {cell([r[key] for r in floor])[1]} |")
