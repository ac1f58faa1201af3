#!/usr/bin/env bash
# Builds the fuzz targets with cargo-afl (AFL++, stable Rust) and runs each for
# SECONDS (default 60), one after the other, on one core. Seeds: fuzz/seeds/<target>
# plus, for the inventory targets, the fixtures in tests/inventories. Findings stay
# in fuzz/out/<target>/ (ignored by git), so a second run continues from the first
# one's queue.
#
# Usage: fuzz/run.sh [SECONDS] [TARGET...]     (default: 60, every target)
#        fuzz/run.sh 600                       # the 10-minutes-per-target run
#        fuzz/run.sh --build                   # only build the targets
# Exit:  0 when no target crashed or hung, 1 when one did (the files are listed);
#        2 when the tools are missing (`bash .ci/setup` installs cargo-afl).
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(inventory_ini inventory_yaml inventory_toml selector versions journal backup_archive)

cargo afl --version >/dev/null 2>&1 || { echo "fuzz/run.sh: cargo-afl missing: run .ci/setup" >&2; exit 2; }

# AFL++'s startup checks are for a dedicated fuzzing machine: a shared CI host has
# no performance governor to set, pipes core dumps to a collector, and has its
# cores busy with other work.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
export AFL_NO_UI=1 AFL_QUIET=1
# Without this AFL++ gives up on a target whose first seed takes over a second, as
# a big inventory can on a loaded machine.
export AFL_FAST_CAL=1

# cargo-afl compiles every crate in one codegen unit at AFL_OPT_LEVEL (its default:
# 3), whatever the profile says; the whole patchbook crate in one unit at
# opt-level 3 was the longest step of the CI. Level 0 unless asked otherwise: a
# 10-second run gains less from a faster target than it loses to the build (a cold
# build took 376 CPU seconds at level 0 without debug info, 984 at level 1 with it).
export AFL_OPT_LEVEL=${AFL_OPT_LEVEL:-0}
cargo afl build --release --quiet
[ "$seconds" != --build ] || exit 0

corpus() {
  local target=$1 dir=corpus/$1
  rm -rf "$dir"
  mkdir -p "$dir"
  [ -d "seeds/$target" ] && cp seeds/"$target"/* "$dir"/
  case $target in
    inventory_ini) cp ../tests/inventories/*.ini "$dir"/ ;;
    inventory_yaml) cp ../tests/inventories/*.yml ../tests/inventories/*.yaml ../tests/inventories/*.json "$dir"/ ;;
    inventory_toml) cp ../tests/inventories/*.toml ../src/cli/init/inventory.toml "$dir"/ ;;
    selector) for f in ../tests/inventories/0[1-5]*.ini; do { echo 'all:!ungrouped'; cat "$f"; } >"$dir/$(basename "$f")"; done ;;
  esac
}

failed=()
for t in "${targets[@]}"; do
  [ -x "target/release/$t" ] || { echo "fuzz/run.sh: no target $t" >&2; exit 2; }
  corpus "$t"
  out=out/$t
  if [ -d "$out/default/queue" ]; then
    find "$out/default/queue" -maxdepth 1 -type f -name 'id:*' -exec cp {} "corpus/$t/" \;
  fi
  rm -rf "$out"
  mkdir -p "$out"
  echo "fuzz: $t for ${seconds}s"
  cargo afl fuzz -V "$seconds" -t 5000 -i "corpus/$t" -o "$out" "target/release/$t" >"$out/log" 2>&1 || {
    echo "fuzz/run.sh: afl-fuzz failed for $t:" >&2
    tail -20 "$out/log" >&2
    exit 2
  }
  stats=$out/default/fuzzer_stats
  execs=$(awk -F': *' '$1 ~ /execs_done/ {print $2}' "$stats")
  paths=$(awk -F': *' '$1 ~ /corpus_count/ {print $2}' "$stats")
  crashes=$(find "$out/default/crashes" -type f -name 'id:*' 2>/dev/null | wc -l)
  hangs=$(find "$out/default/hangs" -type f -name 'id:*' 2>/dev/null | wc -l)
  printf 'fuzz: %-16s %10s execs %6s paths %3s crashes %3s hangs\n' "$t" "$execs" "$paths" "$crashes" "$hangs"
  if [ "$crashes" -gt 0 ] || [ "$hangs" -gt 0 ]; then
    failed+=("$t")
    find "$out/default/crashes" "$out/default/hangs" -type f -name 'id:*' | sed 's/^/  /'
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz/run.sh: findings in ${failed[*]}; reproduce with: fuzz/target/release/TARGET < FILE" >&2
  exit 1
fi
echo "fuzz: no crashes, no hangs"
