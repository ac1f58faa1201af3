#!/usr/bin/env bash
# Latency benchmark (not a test): the fleet benchmark's patch job on N = 20 and 50 lab hosts,
# each behind a lab relay with a 50 ms round trip, by patchbook, the minimal libssh2
# program (1 and 7 exec channels per host) and OpenSSH + xargs, in one run. Prints
# each peer's wall time and request/response turns per host beside patchbook's, with
# the ratios, and writes benches/fleet/results-rtt.md. Needs root and `.ci/setup`.
#
# Usage: benches/fleet/latency.sh [--rtt 50ms] [--sizes 20,50] [--runs 3] [any run.sh flag]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec benches/fleet/run.sh --rtt 50ms --sizes 20,50 --runs 3 --peers none \
  --only patchbook,ssh2,ssh2-7ch,openssh "$@"
