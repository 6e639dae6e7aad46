#!/usr/bin/env bash
# The abuse run (docs/limits.md): normal clients chat, alone and then while
# attackers from other loopback addresses send endless headers and tags, read
# nothing, flood and hold half-open connections. One fresh release build of
# Rookery on its defaults, except an empty limits.connection_allowlist (the
# attackers come from loopback too, which is allowed by default).
#
#   bench/abuse.sh                                   # 500 users, 1,000 msg/s, 4 attackers of each kind
#   USERS=200 RATE=500 ATTACKERS=5 DURATION=10 bench/abuse.sh
#   KINDS=flood,slow-reader bench/abuse.sh           # some kinds of attack only
#
# The report (abuse.json), the bench's and the server's logs stay in OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
USERS=${USERS:-500}
RATE=${RATE:-1000}
DURATION=${DURATION:-20}
ATTACKERS=${ATTACKERS:-4}
KINDS=${KINDS:-}
PORT=${PORT:-26222}
OUT=${OUT:-$ROOT/target/abuse/$(date +%Y%m%d-%H%M%S)}

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
[limits]
connection_allowlist = []
[log]
level = "warn"
TOML
# Normal users, then 7 accounts per attacker (endless tag 1, slow reader and
# its 3 senders 4, TCP flood 1, WebSocket flood 1).
accounts=$((USERS + 7 * ATTACKERS))
"$BIN/rookery-bench" accounts --users "$accounts" | "$BIN/rookery" user import - > /dev/null
ulimit -n "$(ulimit -Hn)"
"$BIN/rookery" serve > server.log 2>&1 &
server=$!
trap 'kill $server 2> /dev/null; wait $server 2> /dev/null || true' EXIT
for _ in $(seq 100); do
    listening "$PORT" && break
    sleep 0.1
done
echo "results in $OUT" >&2
"$BIN/rookery-bench" --server "127.0.0.1:$PORT" --json abuse.json abuse --users "$USERS" \
    --rate "$RATE" --duration "$DURATION" --attackers "$ATTACKERS" \
    --http "127.0.0.1:$((PORT + 2))" ${KINDS:+--kinds "$KINDS"} 2> bench.log > /dev/null
grep '^abuse: p99' bench.log >&2
