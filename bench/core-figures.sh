#!/usr/bin/env bash
# Core performance figures of one Rookery node, measured with rookery-bench:
# resident memory per idle authenticated session (TLS and plaintext, at 19,000
# sessions) and server CPU per delivered message with latency (chat scenario).
# Each measurement runs RUNS times on a fresh server; the medians are printed.
#
#   bench/core-figures.sh            # 3 runs of each
#   RUNS=5 SESSIONS=10000 bench/core-figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SESSIONS=${SESSIONS:-19000}
CHAT_USERS=${CHAT_USERS:-1000}
CHAT_RATE=${CHAT_RATE:-5000}
PORT=${PORT:-25222}

cargo build --release --quiet -p rookery -p rookery-bench
BIN=$PWD/target/release
WORK=$(mktemp -d)
trap 'pkill -f "$BIN/rookery serve" 2>/dev/null || true; rm -rf "$WORK"' EXIT
cd "$WORK"
cat > rookery.toml <<TOML
[server]
data_dir = "data"
[c2s]
starttls_listen = "127.0.0.1:$PORT"
direct_tls_listen = "127.0.0.1:$((PORT + 1))"
[http]
listen = "127.0.0.1:$((PORT + 2))"
[log]
level = "warn"
TOML
"$BIN/rookery-bench" accounts --users "$SESSIONS" | "$BIN/rookery" user import - > /dev/null

serve() {
    "$BIN/rookery" serve > server.log 2>&1 &
    for _ in $(seq 100); do
        (echo > /dev/tcp/127.0.0.1/$PORT) 2> /dev/null && return
        sleep 0.1
    done
    echo "server did not start" >&2
    exit 1
}
stop() {
    pkill -f "$BIN/rookery serve" || true
    while pgrep -f "$BIN/rookery serve" > /dev/null; do sleep 0.2; done
}

for run in $(seq "$RUNS"); do
    serve
    "$BIN/rookery-bench" --server 127.0.0.1:$PORT --tls starttls --json "tls-$run.json" connections --users "$SESSIONS" --concurrency 200 --hold 1 > /dev/null
    stop
    ROOKERY_C2S__REQUIRE_TLS=false ROOKERY_C2S__ALLOW_PLAINTEXT_AUTH=true serve
    "$BIN/rookery-bench" --server 127.0.0.1:$PORT --tls none --json "plain-$run.json" connections --users "$SESSIONS" --concurrency 200 --hold 1 > /dev/null
    stop
    serve
    "$BIN/rookery-bench" --server 127.0.0.1:$PORT --tls starttls --json "chat-$run.json" chat --users "$CHAT_USERS" --rate "$CHAT_RATE" --duration 10 > /dev/null
    stop
done

python3 - "$RUNS" <<'PY'
import json, statistics, sys
runs = int(sys.argv[1])
def load(kind):
    return [json.load(open(f"{kind}-{n}.json")) for n in range(1, runs + 1)]
def row(label, values, unit):
    print(f"| {label} | {statistics.median(values):.1f} {unit} | {min(values):.1f} | {max(values):.1f} |")
print(f"| figure (median of {runs}) | median | min | max |")
print("| --- | --- | --- | --- |")
tls, plain, chat = load("tls"), load("plain"), load("chat")
row(f"memory per idle session, STARTTLS ({tls[0]['sessions']} sessions)", [r["server_kib_per_session"] for r in tls], "KiB")
row(f"memory per idle session, plaintext ({plain[0]['sessions']} sessions)", [r["server_kib_per_session"] for r in plain], "KiB")
row("logins per second, STARTTLS + SCRAM-SHA-256", [r["logins_per_second"] for r in tls], "/s")
row(f"server CPU per delivered message ({chat[0]['target_rate']} msg/s, TLS)", [r["server_cpu_us_per_message"] for r in chat], "µs")
row("chat latency p50", [r["latency_ms_p50"] for r in chat], "ms")
row("chat latency p99", [r["latency_ms_p99"] for r in chat], "ms")
print(f"| messages lost / duplicated (all runs) | {sum(r['lost'] for r in chat)} / {sum(r['duplicated'] for r in chat)} | | |")
PY
