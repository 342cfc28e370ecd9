#!/usr/bin/env bash
# bench/pgo.sh: stickylb built with profile-guided optimisation (PGO). An instrumented build
# serves a training load, and the release build is then made again with the profile it wrote:
# the compiler lays out and inlines the code by how often each part ran. On the request path this
# is about a fifth fewer instructions and a quarter less user time (PERFORMANCE.md: "A
# profile-guided build"). The code is the same; only the build differs.
#
#   bench/pgo.sh    # -> target/pgo/release/stickylb      TRAIN=2 BASE_PORT=29700
#   COMPARE="pgo=target/pgo/release/stickylb" bench/run.sh   # measured beside the plain build
#
# The training load, TRAIN seconds each (wrk on core 0; stickylb with one worker and two nginx
# upstreams on core 1): keep-alive GETs pinned by the affinity cookie (three times as long as the
# others), GETs from new clients (no cookie: a pin is chosen and set), POSTs with a form body
# (hyper's way in), and a new connection per request. It is the traffic bench/run.sh measures and
# the kinds around it, so the profile favours the common request; a build trained on other
# traffic would favour that.
# Needs: rustup component add llvm-tools; apt-get install nginx wrk (and curl).
set -euo pipefail
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy
TRAIN=${TRAIN:-2} BP=${BASE_PORT:-29700}
P_A=$((BP + 1)) P_B=$((BP + 2)) P_OURS=$((BP + 3))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d /tmp/stickylb-pgo.XXXXXX) NAME=pgo HINT="rustup component add llvm-tools; apt-get install nginx wrk"
NGINX_CPU=1
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
need nginx wrk taskset curl cargo rustc sha256sum
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"
[[ -x $PROFDATA ]] || die "llvm-profdata is missing: rustup component add llvm-tools"
cd "$ROOT"

echo "pgo: instrumented build (target/pgo-gen)" >&2
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$W/raw" cargo build --release -q -p stickylb --target-dir target/pgo-gen
rm -rf "$W/raw"   # what the build's own scripts wrote there; only the training counts

upstream_run up-A "$P_A" A
upstream_run up-B "$P_B" B
stickylb_toml "$P_OURS" "" "$P_A" "$P_B" >"$W/stickylb.toml"
stickylb_run target/pgo-gen/release/stickylb "$P_OURS"
printf 'wrk.method = "POST"\nwrk.body = "name=visitor&note=%s"\n' "$(head -c 300 /dev/zero | tr '\0' x)" >"$W/post.lua"
printf 'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n' >>"$W/post.lua"
load() {   # seconds, wrk arguments... -> wrk on core 0 against stickylb; dies on errors
    local out
    out=$(taskset -c 0 wrk -t1 -c50 -d"$1s" "${@:2}" "http://127.0.0.1:$P_OURS/")
    grep -q "Non-2xx\|Socket errors" <<<"$out" && die "training: wrk reported errors: $out"
    echo "pgo: trained on $(awk '/ requests in / {print $1}' <<<"$out") requests (${*:2})" >&2
}
load $((3 * TRAIN)) -H "Cookie: $(stickylb_cookie "$P_OURS")"
load "$TRAIN"
load "$TRAIN" -s "$W/post.lua"
load "$TRAIN" -H "Connection: close"
kill -INT "$OURS"; wait "$OURS" || die "the instrumented stickylb did not stop cleanly (see $W)"
compgen -G "$W/raw/*.profraw" >/dev/null || die "the training wrote no profile (see $W)"

"$PROFDATA" merge -o "$W/merged.profdata" "$W/raw"
# Named by its content: cargo rebuilds when RUSTFLAGS change, not when a file they name does.
mkdir -p target/pgo && rm -f target/pgo/stickylb-*.profdata
PROFILE="$ROOT/target/pgo/stickylb-$(sha256sum "$W/merged.profdata" | cut -c1-16).profdata"
mv "$W/merged.profdata" "$PROFILE"
echo "pgo: optimised build (target/pgo)" >&2
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE" cargo build --release -q -p stickylb --target-dir target/pgo
echo "$ROOT/target/pgo/release/stickylb"
