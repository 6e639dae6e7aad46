#!/usr/bin/env bash
# A 2-node Rookery cluster beside a 2-node ejabberd cluster on this machine,
# the same cross-node scenarios against both in one window (issue 22):
#   - Rookery: two release nodes on one NATS server (JetStream) and one
#     PostgreSQL database;
#   - ejabberd 23.01 from Debian: two Erlang nodes (ejabberd-c1@localhost,
#     ejabberd-c2@localhost) with their own ports and spool folders, joined
#     with `ejabberdctl join_cluster`, accounts in Mnesia (ejabberd's own
#     cluster store; SQLite would be one file per node).
# Users are split over the two nodes and write to anyone (--placement any),
# so about half of the messages cross nodes. For each cluster, alternated
# RUNS times on fresh processes:
#   - a moderate rate (CHAT_RATE): CPU per delivered message of every
#     process on the message path (both nodes; for Rookery also
#     nats-server), latency p50/p99;
#   - the highest rate with p99 under 100 ms and nothing lost (--find-max).
# The medians and the ratios Rookery/ejabberd are printed as a table.
#
#   INSTALL=1 bench/cluster-compare.sh          # installs ejabberd from Debian first
#   RUNS=5 CHAT_RATE=2000 bench/cluster-compare.sh
#
# Needs nats-server and PostgreSQL on 127.0.0.1:5432 (trust authentication
# for the user in PG_URL; a database rookery_cc_<pid> is created and dropped).
# Results (JSON of every run, logs) stay in OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
RUNS=${RUNS:-3}
USERS=${USERS:-1000}
CHAT_RATE=${CHAT_RATE:-2000}
CHAT_SECONDS=${CHAT_SECONDS:-10}
FIND_START=${FIND_START:-2000}
FIND_SECONDS=${FIND_SECONDS:-5}
FIND_FACTOR=${FIND_FACTOR:-1.25}
FIND_REFINE=${FIND_REFINE:-3}
PORT=${PORT:-28222}
NATS_PORT=${NATS_PORT:-28422}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
MECHANISM=SCRAM-SHA-1 # ejabberd stores SHA-1 keys (bench/peers/ejabberd.yml)
OUT=${OUT:-$ROOT/target/cluster-compare/$(date +%Y%m%d-%H%M%S)}
DB=rookery_cc_$$

if [ "${INSTALL:-0}" = 1 ]; then
    install_quietly ejabberd openssl
fi
ulimit -n "$(ulimit -Hn)"

cargo build --release --quiet -p rookery -p rookery-bench
BIN=$ROOT/target/release
mkdir -p "$OUT"
echo "results in $OUT" >&2

rookery_port() { echo $((PORT + 10 * $1)); }      # node 1, 2
ejabberd_port() { echo $((PORT + 10 * $1 + 20)); } # node 1, 2
ejabberd_node() { echo "ejabberd-c$1@localhost"; }

# --- Rookery: NATS, PostgreSQL, two nodes --------------------------------
nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$OUT/nats" > "$OUT/nats.log" 2>&1 &
NATS_PID=$!
psql "$PG_URL/postgres" -qc "CREATE DATABASE $DB"
for node in 1 2; do
    mkdir -p "$OUT/rookery$node"
    cluster_node_toml "$OUT/rookery$node/rookery.toml" "$OUT/rookery$node/data" \
        "$(rookery_port $node)" "$PG_URL/$DB" "$NATS_PORT" "node$node"
done

# --- ejabberd: two Erlang nodes, Mnesia ------------------------------------
for node in 1 2; do
    dir=$OUT/ejabberd$node
    mkdir -p "$dir/logs" "$dir/spool"
    self_signed_cert "$dir"
    render_config ejabberd.yml "$dir/ejabberd.yml" "$dir" "$(ejabberd_port $node)" true false
    # The cluster keeps accounts in Mnesia, replicated by ejabberd itself.
    sed -i -e 's/^auth_method: sql/auth_method: internal/' -e '/^sql_type:/d' \
        -e '/^sql_database:/d' -e 's/^default_db: sql/default_db: mnesia/' "$dir/ejabberd.yml"
    chown -R ejabberd:ejabberd "$dir"
done
ejabberdctl_as() { # node, ejabberdctl arguments...
    local node=$1
    shift
    # su and runuser reset the soft file limit: raised again.
    runuser -u ejabberd -- sh -c 'ulimit -n "$(ulimit -Hn)"; exec "$@"' sh \
        ejabberdctl --config-dir "$OUT/ejabberd$node" \
        --config "$OUT/ejabberd$node/ejabberd.yml" --logs "$OUT/ejabberd$node/logs" \
        --spool "$OUT/ejabberd$node/spool" --node "$(ejabberd_node "$node")" "$@"
}

wait_for() { # port, what
    for _ in $(seq 600); do
        listening "$1" && return
        sleep 0.2
    done
    echo "$2 did not listen on $1; see $OUT" >&2
    exit 1
}

start() { # cluster
    case "$1" in
        rookery)
            for node in 1 2; do
                "$BIN/rookery" --config "$OUT/rookery$node/rookery.toml" serve \
                    >> "$OUT/rookery$node/server.log" 2>&1 &
                wait_for "$(rookery_port $node)" "rookery node $node"
            done
            ;;
        ejabberd)
            # Both at once: a Mnesia node that stopped before its peer
            # waits for the peer's copy of the tables when it starts.
            for node in 1 2; do
                ejabberdctl_as "$node" foreground >> "$OUT/ejabberd$node/server.log" 2>&1 &
            done
            for node in 1 2; do
                wait_for "$(ejabberd_port $node)" "ejabberd node $node"
            done
            ;;
    esac
}

stop() { # cluster
    local ports pid
    case "$1" in
        rookery) ports="$(rookery_port 1) $(rookery_port 2)" ;;
        ejabberd) ports="$(ejabberd_port 1) $(ejabberd_port 2)" ;;
    esac
    for port in $ports; do
        pid=$(pid_on "$port")
        [ -n "$pid" ] || continue
        kill "$pid" 2> /dev/null || true
        for _ in $(seq 300); do
            kill -0 "$pid" 2> /dev/null || break
            sleep 0.2
        done
        kill -9 "$pid" 2> /dev/null || true
    done
    for port in $ports; do
        while listening "$port"; do sleep 0.2; done
    done
}

cleanup() {
    stop rookery || true
    stop ejabberd || true
    kill "$NATS_PID" 2> /dev/null || true
    sleep 1
    psql "$PG_URL/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" > /dev/null 2>&1 || true
}
trap cleanup EXIT

for port in $(rookery_port 1) $(rookery_port 2) $(ejabberd_port 1) $(ejabberd_port 2); do
    if listening "$port"; then
        echo "port $port is already taken: stop what listens there or set PORT" >&2
        exit 1
    fi
done

servers() { # cluster -> the bench's --server list
    case "$1" in
        rookery) echo "127.0.0.1:$(rookery_port 1),127.0.0.1:$(rookery_port 2)" ;;
        ejabberd) echo "127.0.0.1:$(ejabberd_port 1),127.0.0.1:$(ejabberd_port 2)" ;;
    esac
}
pids() { # cluster -> every process on the message path
    case "$1" in
        rookery) echo "$(pid_on "$(rookery_port 1)"),$(pid_on "$(rookery_port 2)"),$NATS_PID" ;;
        ejabberd) echo "$(pid_on "$(ejabberd_port 1)"),$(pid_on "$(ejabberd_port 2)")" ;;
    esac
}
bench() { # cluster, rookery-bench arguments...
    local cluster=$1
    shift
    "$BIN/rookery-bench" --mechanism "$MECHANISM" --server "$(servers "$cluster")" \
        --server-pid "$(pids "$cluster")" --tls starttls "$@" 2>> "$OUT/bench.log" > /dev/null
    sleep 3
}

# Accounts, and the ejabberd cluster joined (once: Mnesia keeps both).
"$BIN/rookery-bench" accounts --users "$USERS" |
    "$BIN/rookery" --config "$OUT/rookery1/rookery.toml" user import - > /dev/null
start ejabberd
ejabberdctl_as 2 join_cluster "$(ejabberd_node 1)" > "$OUT/join.log" 2>&1
for _ in $(seq 100); do
    ejabberdctl_as 1 list_cluster 2> /dev/null | grep -q "$(ejabberd_node 2)" && break
    sleep 0.5
done
ejabberdctl_as 1 list_cluster | grep -q "$(ejabberd_node 2)" ||
    { echo "the ejabberd nodes did not join; see $OUT/join.log" >&2; exit 1; }
"$BIN/rookery-bench" --mechanism "$MECHANISM" --server "127.0.0.1:$(ejabberd_port 1)" --tls starttls \
    --source-ips 1 register --users "$USERS" 2>> "$OUT/bench.log" > /dev/null
stop ejabberd

for run in $(seq "$RUNS"); do
    for cluster in rookery ejabberd; do
        echo "run $run: $cluster" >&2
        start "$cluster"
        bench "$cluster" --json "$OUT/$cluster-chat-$run.json" \
            chat --users "$USERS" --rate "$CHAT_RATE" --duration "$CHAT_SECONDS" --placement any
        bench "$cluster" --json "$OUT/$cluster-findmax-$run.json" \
            chat --users "$USERS" --rate "$FIND_START" --duration "$FIND_SECONDS" --placement any \
            --find-max --step-factor "$FIND_FACTOR" --refine-steps "$FIND_REFINE"
        stop "$cluster"
    done
done

python3 - "$OUT" "$RUNS" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
def load(cluster, kind):
    return [json.load(open(f"{out}/{cluster}-{kind}-{n}.json")) for n in range(1, runs + 1)]
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")
figures = {}
for cluster in ("rookery", "ejabberd"):
    chat, findmax = load(cluster, "chat"), load(cluster, "findmax")
    figures[cluster] = {
        "CPU per message, all processes (µs)": median([r["server_cpu_us_per_message"] for r in chat]),
        "latency p50 (ms)": median([r["latency_ms_p50"] for r in chat]),
        "latency p99 (ms)": median([r["latency_ms_p99"] for r in chat]),
        "lost (sum)": sum(r["lost"] for r in chat),
        "highest rate, p99 <= 100 ms, none lost (msg/s)": median([r["max_sustained_rate"] for r in findmax]),
    }
rate = load("rookery", "chat")[0]["target_rate"]
print(f"2 nodes each, users split, about half of the messages cross; chat at {rate} msg/s; medians of {runs}")
print("| figure | Rookery | ejabberd | Rookery / ejabberd |")
print("| --- | --- | --- | --- |")
for name in figures["rookery"]:
    r, e = figures["rookery"][name], figures["ejabberd"][name]
    ratio = f"{r / e:.2f}" if e else "-"
    print(f"| {name} | {r:.1f} | {e:.1f} | {ratio} |")
PY
