#!/usr/bin/env bash
# Cluster performance figures, measured with rookery-bench against two
# Rookery nodes (release build) on one NATS server and one PostgreSQL
# database, all on this machine:
#   - 1:1 message latency when sender and recipient are on the same node and
#     when they are on different nodes (the added cost of crossing nodes);
#   - the highest message rate across two nodes with p99 under 100 ms and no loss;
#   - failover: a node is killed (SIGKILL) and its users' contacts on the other
#     node wait for their unavailable presence.
# Each measurement runs RUNS times on fresh nodes; the medians are printed.
#
#   bench/cluster-figures.sh
#   RUNS=5 CHAT_RATE=2000 bench/cluster-figures.sh
#
# Needs nats-server and PostgreSQL on 127.0.0.1:5432 (trust authentication for
# the user in PG_URL; a database rookery_bench_<pid> is created and dropped).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
RUNS=${RUNS:-3}
USERS=${USERS:-1000}
CHAT_RATE=${CHAT_RATE:-2000}
RATES=${RATES:-"2000 3000 4000 5000 6000"}
PAIRS=${PAIRS:-200}
PORT=${PORT:-26222}
NATS_PORT=${NATS_PORT:-26422}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
DB=rookery_bench_$$

cargo build --release --quiet -p rookery -p rookery-bench
BIN=$PWD/target/release
WORK=$(mktemp -d)
cleanup() {
    pkill -f "$BIN/rookery --config $WORK" 2>/dev/null || true
    [ -n "${NATS_PID:-}" ] && kill "$NATS_PID" 2>/dev/null || true
    sleep 1
    dropdb --if-exists --force -d "$PG_URL/postgres" "$DB" 2>/dev/null || psql "$PG_URL/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"

nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/nats" > nats.log 2>&1 &
NATS_PID=$!
psql "$PG_URL/postgres" -qc "CREATE DATABASE $DB"

for node in 1 2; do
    cluster_node_toml "node$node.toml" "data$node" $((PORT + 10 * node)) "$PG_URL/$DB" "$NATS_PORT" "node$node"
done
NODE1=127.0.0.1:$((PORT + 10))
NODE2=127.0.0.1:$((PORT + 20))

serve() {
    for node in 1 2; do
        "$BIN/rookery" --config "$WORK/node$node.toml" serve >> "node$node.log" 2>&1 &
        for _ in $(seq 300); do
            (echo > /dev/tcp/127.0.0.1/$((PORT + 10 * node))) 2> /dev/null && break
            sleep 0.1
        done
    done
}
stop() {
    pkill -f "$BIN/rookery --config $WORK" || true
    while pgrep -f "$BIN/rookery --config $WORK" > /dev/null; do sleep 0.2; done
}
nats_ticks() {
    # utime + stime of nats-server, in clock ticks (1/100 s).
    awk '{print $14 + $15}' "/proc/$NATS_PID/stat"
}
bench() {
    "$BIN/rookery-bench" --server "$NODE1,$NODE2" --tls starttls "$@"
}

"$BIN/rookery-bench" accounts --users "$USERS" | "$BIN/rookery" --config node1.toml user import - > /dev/null

for run in $(seq "$RUNS"); do
    serve
    for placement in same cross; do
        before=$(nats_ticks)
        bench --json "$placement-$run.json" chat --users "$USERS" --rate "$CHAT_RATE" --duration 10 --placement "$placement" > /dev/null
        echo $(( $(nats_ticks) - before )) > "$placement-$run.nats"
    done
    for rate in $RATES; do
        bench --json "max-$run-$rate.json" chat --users "$USERS" --rate "$rate" --duration 10 --placement cross > /dev/null
    done
    bench --json "failover-$run.json" failover --pairs "$PAIRS" > /dev/null
    stop
done

python3 - "$RUNS" "$RATES" <<'PY'
import json, statistics, sys
runs, rates = int(sys.argv[1]), [int(r) for r in sys.argv[2].split()]
def load(kind):
    return [json.load(open(f"{kind}-{n}.json")) for n in range(1, runs + 1)]
def row(label, values, unit):
    print(f"| {label} | {statistics.median(values):.1f} {unit} | {min(values):.1f} | {max(values):.1f} |")
same, cross, failover = load("same"), load("cross"), load("failover")
print(f"| figure (median of {runs}) | median | min | max |")
print("| --- | --- | --- | --- |")
rate = same[0]["target_rate"]
row(f"same-node latency p50 ({rate} msg/s)", [r["latency_ms_p50"] for r in same], "ms")
row(f"same-node latency p99 ({rate} msg/s)", [r["latency_ms_p99"] for r in same], "ms")
row(f"cross-node latency p50 ({rate} msg/s)", [r["latency_ms_p50"] for r in cross], "ms")
row(f"cross-node latency p99 ({rate} msg/s)", [r["latency_ms_p99"] for r in cross], "ms")
row("added by crossing nodes, p50", [c["latency_ms_p50"] - s["latency_ms_p50"] for s, c in zip(same, cross)], "ms")
row("added by crossing nodes, p99", [c["latency_ms_p99"] - s["latency_ms_p99"] for s, c in zip(same, cross)], "ms")
row("server CPU per message, same node (both nodes)", [r["server_cpu_us_per_message"] for r in same], "µs")
row("server CPU per message, cross node (both nodes)", [r["server_cpu_us_per_message"] for r in cross], "µs")
def nats_us(kind, reports):
    return [int(open(f"{kind}-{n}.nats").read()) * 10000 / r["delivered"] for n, r in zip(range(1, runs + 1), reports)]
row("nats-server CPU per message, same node", nats_us("same", same), "µs")
row("nats-server CPU per message, cross node", nats_us("cross", cross), "µs")
best = []
for n in range(1, runs + 1):
    ok = [r for r in rates
          if (lambda j: j["lost"] == 0 and j["latency_ms_p99"] < 100)(json.load(open(f"max-{n}-{r}.json")))]
    best.append(max(ok) if ok else 0)
row("highest cross-node rate with p99 < 100 ms, no loss", best, "msg/s")
row(f"failover, kill to unavailable seen, p50 ({failover[0]['pairs']} contacts)", [r["failover_ms_p50"] for r in failover], "ms")
row("failover, kill to unavailable seen, max", [r["failover_ms_max"] for r in failover], "ms")
lost = sum(r["lost"] for r in same + cross)
print(f"| messages lost / duplicated (latency runs) | {lost} / {sum(r['duplicated'] for r in same + cross)} | | |")
PY
