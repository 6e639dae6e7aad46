#!/usr/bin/env bash
# The soak run (docs/limits.md): USERS sessions on one fresh release build of
# Rookery (defaults) under steady 1:1 chat, presence changes and
# reconnections for DURATION seconds; memory, CPU and open files sampled
# every SAMPLE seconds, the memory trend of the second half, every message
# accounted for. Take RATE as half of what `chat --find-max` sustains with
# as many users on the same machine (FIND=1 measures that first, in the
# same window, and uses half of it).
#
#   bench/soak.sh                                     # 19,000 users, one hour
#   FIND=1 bench/soak.sh
#   USERS=2000 RATE=2000 DURATION=600 bench/soak.sh
#
# The report (soak.json), the bench's and the server's logs stay in OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
USERS=${USERS:-19000}
RATE=${RATE:-5000}
PRESENCE_RATE=${PRESENCE_RATE:-200}
RECONNECT_RATE=${RECONNECT_RATE:-20}
DURATION=${DURATION:-3600}
SAMPLE=${SAMPLE:-10}
FIND=${FIND:-0}
PORT=${PORT:-26322}
OUT=${OUT:-$ROOT/target/soak/$(date +%Y%m%d-%H%M%S)}

cargo build --release --quiet -p rookery -p rookery-bench
BIN=$ROOT/target/release
mkdir -p "$OUT"
cd "$OUT"
if listening "$PORT"; then
    echo "port $PORT is taken: stop what listens there or set PORT" >&2
    exit 1
fi
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
"$BIN/rookery-bench" accounts --users "$USERS" | "$BIN/rookery" user import - > /dev/null
ulimit -n "$(ulimit -Hn)"
start() {
    "$BIN/rookery" serve >> server.log 2>&1 &
    server=$!
    for _ in $(seq 100); do
        listening "$PORT" && return
        sleep 0.1
    done
}
stop() { kill "$server" 2> /dev/null; wait "$server" 2> /dev/null || true; }
trap stop EXIT
echo "results in $OUT" >&2
if [ "$FIND" = 1 ]; then
    start
    "$BIN/rookery-bench" --server "127.0.0.1:$PORT" --json find-max.json chat --users "$USERS" \
        --rate 2000 --duration 10 --find-max 2>> bench.log > /dev/null
    stop
    best=$(python3 -c 'import json; print(json.load(open("find-max.json"))["max_sustained_rate"] or 0)')
    RATE=$((best / 2))
    echo "highest sustained rate with $USERS users: $best msg/s; soaking at $RATE" >&2
fi
start
"$BIN/rookery-bench" --server "127.0.0.1:$PORT" --json soak.json soak --users "$USERS" \
    --rate "$RATE" --presence-rate "$PRESENCE_RATE" --reconnect-rate "$RECONNECT_RATE" \
    --duration "$DURATION" --sample "$SAMPLE" 2>> bench.log > /dev/null
grep '^soak: sent' bench.log >&2
