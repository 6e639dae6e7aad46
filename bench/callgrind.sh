#!/usr/bin/env bash
# Counts the Rookery server's own instructions per delivered 1:1 message,
# under valgrind's callgrind: a count, not a time, so it repeats to within a
# fraction of a percent whatever else the machine is doing. That makes it the
# A/B measure for a change of a few percent on the message path, where CPU
# time on this shared machine (no hardware counters) drowns in noise.
#
# The server runs on the comparison's configuration (bench/peers/rookery.toml,
# STARTTLS, SQLite). After the accounts are made, two chat runs at the same
# rate, a short and a long one, are counted separately; the login and set-up
# cost is the same in both, so
#   instructions per message = (long - short) / (delivered long - delivered short).
# User-space instructions only: the kernel's share (the loopback write) is not
# counted.
#
#   bench/callgrind.sh                        # prints instructions per message
#   USERS=100 RATE=200 SHORT=5 LONG=15 bench/callgrind.sh
#   BIN=/tmp/other/target/release bench/callgrind.sh   # binaries built elsewhere
#   SCENARIO=presence USERS=40 CONTACTS=8 RATE=20 bench/callgrind.sh   # per delivered presence
#   callgrind_annotate target/callgrind/<dir>/long.out | head -60   # where they go
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
PORT=${PORT:-28222}
USERS=${USERS:-100}
RATE=${RATE:-200}
SHORT=${SHORT:-5}
LONG=${LONG:-15}
OUT=${OUT:-$PWD/target/callgrind/$(date +%Y%m%d-%H%M%S)}
command -v valgrind > /dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
# BIN=<dir> counts binaries built elsewhere (another profile or commit) as they are.
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet -p rookery -p rookery-bench
    BIN=$PWD/target/release
fi
mkdir -p "$OUT"
if listening "$PORT"; then
    echo "port $PORT is already taken: stop what listens there or set PORT" >&2
    exit 1
fi

self_signed_cert "$OUT"
render_config rookery.toml "$OUT/rookery.toml" "$OUT" "$PORT" true false

valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.%p" \
    "$BIN/rookery" --config "$OUT/rookery.toml" serve > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2> /dev/null || true; wait $server 2> /dev/null || true' EXIT

bench() { "$BIN/rookery-bench" --server "127.0.0.1:$PORT" --source-ips 1 "$@" 2>> "$OUT/bench.log"; }
for _ in $(seq 600); do
    bench register --users 1 > /dev/null && break
    sleep 0.5
done
bench --json "$OUT/register.json" register --users "$USERS" > /dev/null

# SCENARIO=presence counts per delivered presence instead: users with
# rosters of CONTACTS contacts (subscribed once, uncounted) change presence
# at RATE changes a second.
SCENARIO=${SCENARIO:-chat}
CONTACTS=${CONTACTS:-8}
run() { # json, seconds
    case "$SCENARIO" in
        chat) bench --json "$1" chat --users "$USERS" --rate "$RATE" --duration "$2" ;;
        presence) bench --json "$1" presence --users "$USERS" --contacts "$CONTACTS" --rate "$RATE" --duration "$2" ;;
        *) echo "SCENARIO is chat or presence" >&2; exit 1 ;;
    esac
}
[ "$SCENARIO" = presence ] && run "$OUT/setup.json" 1 > /dev/null

# Counts the instructions of one run into OUT/<name>.out.
counted() { # name, seconds
    callgrind_control -z "$server" > /dev/null 2>&1
    run "$OUT/$1.json" "$2" > /dev/null
    callgrind_control -d "$1" "$server" > /dev/null 2>&1
    mv "$(ls -t "$OUT"/callgrind.*."$1"* 2> /dev/null | head -1 || ls -t "$OUT"/callgrind.* | head -1)" "$OUT/$1.out"
}
counted short "$SHORT"
counted long "$LONG"

python3 - "$OUT" "$SCENARIO" << 'EOF'
import json, sys
out, scenario = sys.argv[1], sys.argv[2]
def instructions(name):
    for line in open(f"{out}/{name}.out"):
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {name}.out")
def delivered(name):
    report = json.load(open(f"{out}/{name}.json"))
    return report.get("delivered", report.get("deliveries"))
i_short, i_long = instructions("short"), instructions("long")
d_short, d_long = delivered("short"), delivered("long")
per = (i_long - i_short) / (d_long - d_short)
print(f"messages {d_short} and {d_long}; instructions {i_short} and {i_long}")
print(f"instructions per {'message' if scenario == 'chat' else 'delivered presence'}: {per:.0f}")
json.dump({"instructions_per_message": per, "short": [d_short, i_short], "long": [d_long, i_long]},
          open(f"{out}/result.json", "w"))
EOF
echo "results in $OUT" >&2
