#!/usr/bin/env bash
# Fleet benchmark (not a test): patchbook against an OpenSSH + xargs script, a
# minimal libssh2 program (1 and 7 exec channels per host), pyinfra and Ansible, on
# lab fleets of real sshd hosts. Prints the table and writes benches/fleet/results.md.
# Needs root (the lab uses mount and PID namespaces) and `.ci/setup`.
#
# Usage: benches/fleet/run.sh [--sizes 10,50,100] [--runs 3] [--peers all|none]
#                             [--only LIST] [--sim 100000] [--out FILE] [--keep]
#        benches/fleet/run.sh --sizes none --sim 100000   (the controller-scale part alone)
#        benches/fleet/run.sh --all   (every speed goal in one run: benches/fleet/results-all.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "run.sh: run as root (the lab needs mount namespaces)" >&2; exit 2; }
cargo build --release --quiet --features lab --bin patchbook --example fleet-bench
exec target/release/examples/fleet-bench "$@"
