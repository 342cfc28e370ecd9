#!/usr/bin/env bash
# bench/sched.sh: how the upstream on the proxy's core is scheduled, for stickylb, HAProxy and
# HAProxy as a TCP relay. bench/run.sh finds each proxy waking upstream A a different number of
# times per request; this records the core's context switches (perf sched) for a moment of each
# run and sorts the upstream's runs: short ones (under 30 us: woken by one request, which
# preempted the proxy, answered, asleep again; "ping-pong") and long ones (many requests found at
# once). Fewer, longer runs cost the shared core less per request. Last, the proxy's long runs
# (30 us or more) for each long run of the upstream.
#
#   bench/sched.sh [BINARY]    # DUR=5 REC=0.5 CONNS=50 BASE_PORT=29500
#
# One nginx upstream; proxies and upstream on core 1, wrk on core 0, as in bench/run.sh.
# Needs: apt-get install haproxy nginx wrk linux-perf (and curl, python3).
set -euo pipefail
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy
DUR=${DUR:-5} REC=${REC:-0.5} CONNS=${CONNS:-50} BP=${BASE_PORT:-29500}
P_UP=$((BP + 1)) P_OURS=$((BP + 2)) P_HAPROXY=$((BP + 3)) P_RELAY=$((BP + 4))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d /tmp/stickylb-sched.XXXXXX) NAME=sched HINT="apt-get install haproxy nginx wrk linux-perf"
NGINX_CPU=1
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
need haproxy nginx wrk perf taskset curl python3
upstream_run up "$P_UP" A
UP=$(pgrep -P "$(<"$W/up/nginx.pid")")
stickylb_alone "${1:-}" "$P_OURS" "$P_UP"
haproxy_sticky "$P_HAPROXY" "$P_UP" >"$W/haproxy.cfg"
haproxy_relay "$P_RELAY" "$P_UP" >"$W/relay.cfg"
haproxy_run haproxy "$P_HAPROXY" 1
haproxy_run relay "$P_RELAY" 1
COOKIE=$(stickylb_cookie "$P_OURS")

record() {   # label port cookie -> a row: the upstream's runs while wrk drives the proxy
    taskset -c 0 wrk -t1 -c"$CONNS" -d"${DUR}s" -H "Cookie: $3" "http://127.0.0.1:$2/" >"$W/wrk-$1.txt" &
    local wrk=$!
    sleep 1   # past wrk's connecting: the record is of the steady state
    perf sched record -C 1 -o "$W/$1.data" -- sleep "$REC" >/dev/null 2>&1
    wait "$wrk"
    perf sched timehist -i "$W/$1.data" 2>/dev/null >"$W/$1.txt"
    python3 - "$1" "$W/$1.txt" "$UP" "$W/wrk-$1.txt" "$REC" <<'PY'
import re, sys
label, hist, up, wrk, rec = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", open(wrk).read()).group(1))
runs, proxy_long = [], 0   # the upstream's runs on the core, in us; the proxy's long runs
for line in open(hist):
    f = line.split()
    if len(f) != 6 or f[1] != "[0001]":
        continue
    if f[2].endswith(f"[{up}]"):
        runs.append(float(f[5]) * 1000)
    elif f[2].startswith(("stickylb[", "haproxy[")) and float(f[5]) >= 0.030:
        proxy_long += 1
short = [r for r in runs if r < 30]
n = rps * rec   # requests in the record, from wrk's rate
chains = len(short) / max(1, len(runs) - len(short))
print(f"| {label} | {rps:,.0f} | {len(runs) / n:.3f} | {len(short) / max(1, len(runs)):.2f} | "
      f"{chains:.1f} | {sum(short) / n:.2f} | {sum(runs) / n:.2f} | "
      f"{proxy_long / max(1, len(runs) - len(short)):.2f} |")
PY
}
echo "The upstream's runs on the shared core ($REC s of perf sched within $DUR s of wrk -t1 -c$CONNS)"
echo
echo "| proxy | requests/s | upstream runs per request | share under 30 us | short runs per long one | us per request in short runs | in all runs | proxy's long runs per upstream's |"
echo "|---|---|---|---|---|---|---|---|"
record stickylb "$P_OURS" "$COOKIE"
record haproxy "$P_HAPROXY" "SRV=A"
record tcp-relay "$P_RELAY" "none=0"
