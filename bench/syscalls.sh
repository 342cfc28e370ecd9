#!/usr/bin/env bash
# bench/syscalls.sh: system calls per proxied request, stickylb against HAProxy, counted by the
# kernel's tracepoints (perf stat) while wrk drives one proxy at a time. The kernel spends more per
# request than either proxy's own code (bench/run.sh: about 14 us against 5-6), and most of it
# follows from the calls made: a proxy that relays one request per receive and send on each leg
# makes four, and anything above that is a receive that found nothing, or a wait. The TCP segments
# sent per request (nstat, the whole machine's) say the same of the wire: four, none a pure ACK.
#
#   bench/syscalls.sh [BINARY]    # DUR=3 CONNS=50 BASE_PORT=29400
#
# One nginx upstream, each proxy with one worker thread and a sticky cookie to it; proxies and
# upstream on core 1, wrk on core 0, as in bench/run.sh.
# Needs: apt-get install haproxy nginx wrk linux-perf (and curl).
set -euo pipefail
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy
DUR=${DUR:-3} CONNS=${CONNS:-50} BP=${BASE_PORT:-29400}
P_UP=$((BP + 1)) P_OURS=$((BP + 2)) P_HAPROXY=$((BP + 3))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d /tmp/stickylb-sys.XXXXXX) NAME=syscalls HINT="apt-get install haproxy nginx wrk linux-perf"
NGINX_CPU=1
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
need haproxy nginx wrk perf nstat taskset curl
upstream_run up "$P_UP" A
stickylb_alone "${1:-}" "$P_OURS" "$P_UP"
haproxy_sticky "$P_HAPROXY" "$P_UP" >"$W/haproxy.cfg"
haproxy_run haproxy "$P_HAPROXY" 1
COOKIE=$(stickylb_cookie "$P_OURS")
CALLS=(recvfrom sendto read write readv writev epoll_wait epoll_ctl clock_gettime)
EVENTS=(-e raw_syscalls:sys_enter)
for c in "${CALLS[@]}"; do EVENTS+=(-e "syscalls:sys_enter_$c"); done
export NSTAT_HISTORY=$W/nstat   # nstat's counters are the machine's: run this on a quiet one
count() {   # label pid port cookie -> a row: each call per request, then the TCP segments sent
    # and how many of them were pure ACKs (four per request, none pure, is the floor for a relay)
    nstat -n
    perf stat -x, "${EVENTS[@]}" -p "$2" -o "$W/perf-$1.csv" -- \
        taskset -c 0 wrk -t1 -c"$CONNS" -d"${DUR}s" -H "Cookie: $4" "http://127.0.0.1:$3/" >"$W/wrk-$1.txt"
    grep -q "Non-2xx\|Socket errors" "$W/wrk-$1.txt" && die "$1: wrk reported errors (see $W)"
    local n; n=$(awk '/ requests in / {print $1}' "$W/wrk-$1.txt")
    awk -F, -v label="$1" -v n="$n" '
        /sys_enter/ {v[++k] = sprintf("%.3f", $1 / n)}
        END {printf "| %s | %s |", label, n; for (i = 1; i <= k; i++) printf " %s |", v[i]}' "$W/perf-$1.csv"
    nstat -z TcpOutSegs TcpExtTCPPureAcks |
        awk -v n="$n" '{v[$1] = $2} END {printf " %.3f | %.3f |\n", v["TcpOutSegs"] / n, v["TcpExtTCPPureAcks"] / n}'
}
echo "System calls per request ($DUR s of wrk -t1 -c$CONNS, keep-alive, sticky cookie; one proxy thread)"
echo
printf '| proxy | requests | all |'; printf ' %s |' "${CALLS[@]}"; echo ' TCP segments | pure ACKs |'
printf '|---|---|---|'; printf -- '---|%.0s' "${CALLS[@]}" 1 2; echo
count stickylb "$OURS" "$P_OURS" "$COOKIE"
count haproxy "$HAPROXY" "$P_HAPROXY" "SRV=A"
