#!/usr/bin/env bash
# bench/peers_slot.sh: the workplace's shared peers script (../shared/bench/peers.sh, the one issue
# 6's targets were set with) with stickylb in its OURS_CMD slot: its table, then its failover probe
# for stickylb three times. peers.sh's own failover mode has no row for the slot, so its functions
# are sourced and run for stickylb as they run for each peer (SIGTERM of upstream A, one curl every
# 50 ms for 5 s). Its requests/s ratio is the median of per-round ratios, as bench/run.sh's;
# bench/run.sh adds the relay, each proxy's CPU time, and the upstream's wake-ups.
#
#   bench/peers_slot.sh [BINARY]   # PEERS=../shared/bench/peers.sh ROUNDS=6 DUR=5 BASE_PORT=18080
#
# stickylb gets what the slot's contract asks: one worker, cookie SRV, upstreams on peers.sh's
# ports, GET /healthz every second. Needs what peers.sh needs: apt-get install haproxy nginx caddy
# wrk.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=$(realpath -m "${PEERS:-$ROOT/../shared/bench/peers.sh}")
BIN=$(realpath -m "${1:-$ROOT/target/release/stickylb}")
BP=${BASE_PORT:-18080}
[[ -f $PEERS ]] || { echo "peers_slot: no $PEERS (set PEERS)" >&2; exit 1; }
[[ -n ${1:-} ]] || (cd "$ROOT" && cargo build --release -q -p stickylb)
[[ -x $BIN ]] || { echo "peers_slot: no binary $BIN" >&2; exit 1; }
CONF=$(mktemp /tmp/stickylb-peers.XXXXXX)
trap 'rm -f "$CONF"' EXIT
cat >"$CONF" <<TOML
[runtime]
workers = 1
[listener]
address = "127.0.0.1:$((BP + 13))"
[affinity]
cookie = "SRV"
secret = "bench-secret-0123456789"
[health]
path = "/healthz"
interval = "1s"
[[backends]]
id = "A"
address = "127.0.0.1:$((BP + 1))"
[[backends]]
id = "B"
address = "127.0.0.1:$((BP + 2))"
TOML
export OURS_CMD="env RUST_LOG=warn $BIN -c $CONF" ROUNDS=${ROUNDS:-6} DUR=${DUR:-5}
bash "$PEERS" bench
printf '\n### Failover of stickylb (peers.sh probe, three times)\n\n'
printf '| peer | failed / total | first..last failure (ms) | first 200 from B (ms) |'
printf ' 200 from A after kill | slowest request (ms) |\n|---|---:|---:|---:|---:|---:|\n'
for _ in 1 2 3; do
    # shellcheck disable=SC2016 # expanded by the inner shell, after sourcing peers.sh
    bash -c 'source "$1"; stale_cleanup; failover_case stickylb "$OURS_PORT" start_ours ""' _ "$PEERS"
done
