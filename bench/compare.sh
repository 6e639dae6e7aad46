#!/usr/bin/env bash
# Rookery, ejabberd and Prosody side by side on this machine, measured by the
# same rookery-bench scenarios in the same run window:
#   - connections: SESSIONS idle authenticated sessions (roster fetched,
#     presence sent); login rate and the server's resident memory per session;
#   - chat: CHAT_USERS online users at CHAT_RATE msg/s (a moderate rate):
#     latency percentiles and server CPU per message;
#   - chat --find-max: the highest rate with p99 <= 100 ms and nothing lost,
#     and the p99 of every server at each rate it stepped through;
#   - login-storm: full logins (TLS, SASL SCRAM-SHA-1, bind) per second;
#   - presence: PRESENCE_USERS users with rosters of PRESENCE_CONTACTS
#     contacts (half online) change presence at PRESENCE_RATE changes/s:
#     fan-out latency and server CPU per delivered presence;
#   - chat over WebSocket (RFC 7395, ws:// on loopback, which all three count
#     as secure, as behind a TLS proxy) at CHAT_RATE msg/s;
#   - floor: no server, the machine's own latency floor at CHAT_RATE (frames
#     paced and timed like chat messages through a bare relay process, plain
#     TCP, no XML), once per run before the servers, in the same window.
# The three servers get the configurations in bench/peers/ (same domain,
# loopback, SQLite storage, SCRAM keys with 4096 iterations, no shaping,
# warnings-only logs) and the same TLS setting. Each run restarts every
# server; the table shows the median of RUNS runs with min and max, and the
# ratios Rookery/ejabberd and Rookery/Prosody.
#
#   INSTALL=1 bench/compare.sh                   # installs ejabberd and Prosody from Debian first
#   RUNS=3 TLS=none bench/compare.sh             # plain TCP on all three
#   SERVERS="rookery ejabberd" SESSIONS=5000 bench/compare.sh
#   SCENARIOS="findmax storm" SESSIONS=1000 bench/compare.sh   # a subset
#   SERVER_CPUS=0 BENCH_CPUS=1 bench/compare.sh  # each server on CPU 0, the load generator on CPU 1
#
# Results (JSON of every scenario, server logs, the table) stay in OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
RUNS=${RUNS:-3}
SERVERS=${SERVERS:-"rookery ejabberd prosody"}
TLS=${TLS:-starttls}
SESSIONS=${SESSIONS:-19000}
CHAT_USERS=${CHAT_USERS:-1000}
CHAT_RATE=${CHAT_RATE:-1000}
CHAT_SECONDS=${CHAT_SECONDS:-10}
FIND_START=${FIND_START:-2000}
FIND_FACTOR=${FIND_FACTOR:-1.25}
FIND_SECONDS=${FIND_SECONDS:-5}
FIND_REFINE=${FIND_REFINE:-3}
STORM_LOGINS=${STORM_LOGINS:-5000}
STORM_CONCURRENCY=${STORM_CONCURRENCY:-50}
PRESENCE_USERS=${PRESENCE_USERS:-200}
PRESENCE_CONTACTS=${PRESENCE_CONTACTS:-20}
PRESENCE_RATE=${PRESENCE_RATE:-100}
SCENARIOS=${SCENARIOS:-"floor connections chat findmax storm presence websocket"}
MECHANISM=SCRAM-SHA-1 # the one all three store keys for by default
PORT=${PORT:-27222}
OUT=${OUT:-$ROOT/target/compare/$(date +%Y%m%d-%H%M%S)}
# CPU lists (taskset) for the servers and the load generator; empty: anywhere.
SERVER_CPUS=${SERVER_CPUS:-}
BENCH_CPUS=${BENCH_CPUS:-}

case "$TLS" in
    starttls) require_tls=true; allow_plain=false ;;
    none) require_tls=false; allow_plain=true ;;
    *) echo "TLS must be starttls or none" >&2; exit 64 ;;
esac

if [ "${INSTALL:-0}" = 1 ]; then
    install_quietly ejabberd erlang-p1-sqlite3 prosody lua-dbi-sqlite3 openssl
fi

# Every process started here (servers and load generator) may use as many
# files as this machine allows.
ulimit -n "$(ulimit -Hn)"

cargo build --release --quiet -p rookery -p rookery-bench
BIN=$ROOT/target/release
mkdir -p "$OUT"
echo "results in $OUT" >&2

on_cpus() { # cpu list, command...: the command confined to the list, if any
    local cpus=$1
    shift
    if [ -n "$cpus" ]; then taskset -c "$cpus" "$@"; else "$@"; fi
}

port_of() { # server -> port
    case "$1" in rookery) echo "$PORT" ;; ejabberd) echo $((PORT + 10)) ;; prosody) echo $((PORT + 20)) ;; esac
}
dir_of() { echo "$OUT/$1"; }

setup() { # server: configuration, certificate, data folder
    local server=$1 dir port
    dir=$(dir_of "$server")
    port=$(port_of "$server")
    mkdir -p "$dir"
    self_signed_cert "$dir"
    local template
    case "$server" in
        rookery) template=rookery.toml ;;
        ejabberd) template=ejabberd.yml; mkdir -p "$dir/logs" "$dir/spool" ;;
        prosody) template=prosody.cfg.lua; mkdir -p "$dir/data" ;;
    esac
    render_config "$template" "$dir/$template" "$dir" "$port" "$require_tls" "$allow_plain"
    case "$server" in
        ejabberd) chown -R ejabberd:ejabberd "$dir" ;;
        prosody) chown -R prosody:prosody "$dir" ;;
    esac
}

start() { # server
    local server=$1 dir port
    dir=$(dir_of "$server")
    port=$(port_of "$server")
    case "$server" in
        rookery)
            on_cpus "$SERVER_CPUS" "$BIN/rookery" --config "$dir/rookery.toml" serve >> "$dir/server.log" 2>&1 &
            ;;
        # Each runs as its own user; su and runuser reset the soft file limit
        # to 1024, so it is raised again to the hard limit before the server starts.
        ejabberd)
            on_cpus "$SERVER_CPUS" runuser -u ejabberd -- sh -c 'ulimit -n "$(ulimit -Hn)"; exec "$@"' sh \
                ejabberdctl --config-dir "$dir" --config "$dir/ejabberd.yml" --logs "$dir/logs" \
                --spool "$dir/spool" --node "ejabberd-bench@localhost" foreground \
                >> "$dir/server.log" 2>&1 &
            ;;
        prosody)
            on_cpus "$SERVER_CPUS" runuser -u prosody -- sh -c 'ulimit -n "$(ulimit -Hn)"; exec "$@"' sh \
                prosody --config "$dir/prosody.cfg.lua" -F >> "$dir/server.log" 2>&1 &
            ;;
    esac
    # Ready when storage answers: registering the first account (again) goes
    # through (ejabberd listens before its SQL pool is up).
    for _ in $(seq 300); do
        if listening "$port" && "$BIN/rookery-bench" --server "127.0.0.1:$port" --tls "$TLS" \
            --source-ips 1 register --users 1 > /dev/null 2>&1; then
            return
        fi
        sleep 0.2
    done
    echo "$server did not start; see $dir/server.log" >&2
    exit 1
}

stop() { # server
    local port pid
    port=$(port_of "$1")
    pid=$(pid_on "$port")
    [ -n "$pid" ] || return 0
    kill "$pid" 2> /dev/null || true
    for _ in $(seq 300); do
        kill -0 "$pid" 2> /dev/null || break
        sleep 0.2
    done
    kill -9 "$pid" 2> /dev/null || true
    while listening "$port"; do sleep 0.2; done
}
cleanup() {
    for server in $SERVERS; do stop "$server" || true; done
}
# A server already on one of the ports (one left running) would be measured
# instead of the one started here, and stopped by the clean-up.
for server in $SERVERS; do
    if listening "$(port_of "$server")"; then
        echo "port $(port_of "$server") ($server) is already taken: stop what listens there or set PORT" >&2
        exit 1
    fi
done
trap cleanup EXIT

# Runs rookery-bench (its report goes to the JSON file its arguments name,
# its messages to bench.log), then lets the server settle.
run_bench() { # rookery-bench arguments...
    local status=0
    on_cpus "$BENCH_CPUS" "$BIN/rookery-bench" --mechanism "$MECHANISM" "$@" 2>> "$OUT/bench.log" > /dev/null || status=$?
    settle
    return $status
}

# Lets the server finish what the last scenario left (the last find-max step
# overloads it on purpose) before the next one starts measuring.
settle() { sleep "${SETTLE:-3}"; }

bench() { # server, rookery-bench arguments...
    local server=$1
    shift
    run_bench --server "127.0.0.1:$(port_of "$server")" --tls "$TLS" "$@"
}

websocket() { # server, rookery-bench arguments...: over ws:// at /xmpp-websocket
    local server=$1
    shift
    run_bench --server "127.0.0.1:$(($(port_of "$server") + 2))" --tls none \
        --websocket /xmpp-websocket "$@"
}

want() { [[ " $SCENARIOS " == *" $1 "* ]]; }

accounts=$SESSIONS
[ "$CHAT_USERS" -gt "$accounts" ] && accounts=$CHAT_USERS
for server in $SERVERS; do
    setup "$server"
    start "$server"
    echo "$server: registering $accounts accounts" >&2
    bench "$server" --source-ips 1 --json "$OUT/$server-register.json" register --users "$accounts"
    # Subscribes the presence scenario's rosters once (minutes on Prosody).
    if want presence; then
        bench "$server" --json "$OUT/$server-presence-setup.json" presence --users "$PRESENCE_USERS" \
            --contacts "$PRESENCE_CONTACTS" --rate "$PRESENCE_RATE" --duration 1 ||
            echo "$server: presence set-up failed; see $OUT/bench.log" >&2
    fi
    stop "$server"
done

for run in $(seq "$RUNS"); do
    if want floor; then
        echo "run $run: floor" >&2
        # The relay stands in for a server: on the servers' CPUs.
        run_bench --json "$OUT/floor-$run.json" \
            floor --users "$CHAT_USERS" --rate "$CHAT_RATE" --duration "$CHAT_SECONDS" \
            ${SERVER_CPUS:+--relay-cpus "$SERVER_CPUS"}
    fi
    for server in $SERVERS; do
        echo "run $run: $server" >&2
        if want connections; then
            start "$server"
            bench "$server" --json "$OUT/$server-connections-$run.json" \
                connections --users "$SESSIONS" --hold 2
            stop "$server"
        fi
        start "$server"
        want chat && bench "$server" --json "$OUT/$server-chat-$run.json" \
            chat --users "$CHAT_USERS" --rate "$CHAT_RATE" --duration "$CHAT_SECONDS"
        want findmax && bench "$server" --json "$OUT/$server-findmax-$run.json" \
            chat --users "$CHAT_USERS" --rate "$FIND_START" --duration "$FIND_SECONDS" \
            --find-max --step-factor "$FIND_FACTOR" --refine-steps "$FIND_REFINE"
        want storm && bench "$server" --json "$OUT/$server-storm-$run.json" \
            login-storm --users "$CHAT_USERS" --logins "$STORM_LOGINS" \
            --concurrency "$STORM_CONCURRENCY"
        if want presence; then
            bench "$server" --json "$OUT/$server-presence-$run.json" \
                presence --users "$PRESENCE_USERS" --contacts "$PRESENCE_CONTACTS" \
                --rate "$PRESENCE_RATE" --duration "$CHAT_SECONDS" ||
                echo "$server: presence failed; see $OUT/bench.log" >&2
        fi
        if want websocket; then
            websocket "$server" --json "$OUT/$server-websocket-$run.json" \
                chat --users "$CHAT_USERS" --rate "$CHAT_RATE" --duration "$CHAT_SECONDS" ||
                echo "$server: WebSocket chat failed; see $OUT/bench.log" >&2
        fi
        stop "$server"
    done
done

python3 bench/table.py "$OUT" "$RUNS" "$SERVERS" "$TLS" "$SESSIONS" "$CHAT_USERS" "$CHAT_RATE" "$FIND_START" | tee "$OUT/table.md"
