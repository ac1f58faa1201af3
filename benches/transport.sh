#!/usr/bin/env bash
# Transport benchmark (not a test): on lab fleets of 10, 50 and 100 hosts, times
#   1. `exec true` on every host,
#   2. a small file upload to every host (re-hashed on the host),
# done by patchbook and by a plain OpenSSH client loop (`xargs -P`), and prints the
# wall time of each and the ratio. Needs root (the lab) and `.ci/setup`.
#
# Usage: benches/transport.sh [SIZE...]          (default: 10 50 100)
# Env:   PB_UPLOAD_SNIPPET  Rhai for the upload step; FILE and DEST are substituted.
#        Playbooks have no bare upload primitive (uploads happen inside `deploy`, which
#        benches/fleet/run.sh measures), so without it the upload row is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "transport.sh: run as root (the lab needs mount namespaces)" >&2; exit 2; }
command -v ssh >/dev/null && command -v scp >/dev/null || { echo "transport.sh: ssh/scp missing: run .ci/setup" >&2; exit 2; }

cargo build --release --quiet --features lab
pb="$PWD/target/release/patchbook"
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(10 50 100)
upload_snippet=${PB_UPLOAD_SNIPPET:-}

work=$(mktemp -d /tmp/patchbook-bench-XXXXXX)
lab=""
cleanup() {
  [ -n "$lab" ] && [ -f "$lab/lab.json" ] && "$pb" lab down "$lab" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

payload="$work/payload.bin"
head -c 16384 /dev/urandom >"$payload"

now() { date +%s.%N; }
# Runs "$@" quietly, prints its wall time in seconds; a failure is reported, not hidden.
timed() {
  local t0 t1 rc=0
  t0=$(now)
  "$@" >"$work/out" 2>"$work/err" || rc=$?
  t1=$(now)
  if [ $rc -ne 0 ]; then
    echo "  ! $1 exited $rc: $(tail -n 3 "$work/err" | tr '\n' ' ')" >&2
  fi
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.1fx", b / a; else print "n/a" }'; }

ssh_opts() {
  echo "-o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=$lab/known_hosts -o IdentitiesOnly=yes -i $lab/id_ed25519 -o LogLevel=ERROR"
}
openssh_exec() { # N
  xargs -P "$1" -I{} ssh $(ssh_opts) -p {} root@127.0.0.1 true <"$work/ports"
}
openssh_upload() { # N
  xargs -P "$1" -I{} sh -c "scp -q $(ssh_opts) -P {} '$payload' root@127.0.0.1:/opt/acme/bench.bin && \
    ssh $(ssh_opts) -p {} root@127.0.0.1 sha256sum -- /opt/acme/bench.bin >/dev/null" <"$work/ports"
}
pb_exec() { # N
  "$pb" --config "$lab/patchbook.toml" --forks "$1" -q exec all 'probe(host, ["true"]).code' |
    awk 'NR > 1 && $2 != "ok" { bad = 1 } END { exit bad }'
}
pb_upload() { # N
  local s=${upload_snippet//FILE/$payload}
  "$pb" --config "$lab/patchbook.toml" --forks "$1" -q exec all "${s//DEST//opt/acme/bench.bin}"
}

printf '%-6s %-8s %10s %10s %8s\n' hosts step patchbook openssh ratio
for n in "${sizes[@]}"; do
  lab="$work/lab$n"
  t_up=$(timed "$pb" lab up "$n" "$lab")
  awk '{ sub(/^\[127\.0\.0\.1\]:/, "", $1); print $1 }' "$lab/known_hosts" >"$work/ports"
  a=$(timed pb_exec "$n"); b=$(timed openssh_exec "$n")
  printf '%-6s %-8s %9ss %9ss %8s\n' "$n" "exec" "$a" "$b" "$(ratio "$a" "$b")"
  if [ -n "$upload_snippet" ]; then
    a=$(timed pb_upload "$n"); b=$(timed openssh_upload "$n")
    printf '%-6s %-8s %9ss %9ss %8s\n' "$n" "upload" "$a" "$b" "$(ratio "$a" "$b")"
  else
    printf '%-6s %-8s %10s\n' "$n" "upload" "skipped (set PB_UPLOAD_SNIPPET; deploy uploads: benches/fleet/run.sh)"
  fi
  echo "       (lab up $n: ${t_up}s)"
  "$pb" lab down "$lab" >/dev/null
done
