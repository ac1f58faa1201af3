#!/usr/bin/env bash
# Inventory benchmark (not a test): generates Ansible INI and YAML inventories of
# the sizes given, shaped like a real fleet (one line per host with ansible_host and
# a few vars, 100 groups of hosts under datacentre and role parents, group vars at
# every level, a few hosts in several groups), and times
#   - `patchbook inventory list`        (load, precedence, host table),
#   - `patchbook inventory list --json` (the ansible-inventory --list structure),
#   - `patchbook inventory list --limit 'role_web:&dc1:!WEB_EXCLUDED'` (a selector),
# printing wall seconds, CPU seconds and peak RSS in MB. Numbers are printed, not
# judged; the goal in the performance issue is 100,000 INI hosts in ≤ 1 s.
#
# Usage: benches/inventory.sh [INI_HOSTS [YAML_HOSTS]]   (default: 100000 200000)
# Env:   PB_PROFILE  cargo profile to build and time (default release; `profiling`
#                    keeps symbols for `perf record`).
set -euo pipefail
cd "$(dirname "$0")/.."

ini_hosts=${1:-100000}
yaml_hosts=${2:-200000}
profile=${PB_PROFILE:-release}
[ -x /usr/bin/time ] || { echo "inventory.sh: /usr/bin/time missing (apt-get install time)" >&2; exit 2; }

cargo build --profile "$profile" --quiet --bin patchbook
pb="$PWD/target/$profile/patchbook"

work=$(mktemp -d /tmp/patchbook-inventory-bench-XXXXXX)
trap 'rm -rf "$work"' EXIT
: >"$work/patchbook.toml"

# One generator for both formats, so the two describe the same fleet.
python3 - "$work" "$ini_hosts" "$yaml_hosts" <<'PY'
import sys
work, ini_n, yaml_n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
DCS, ROLES = 5, 20  # 100 leaf groups

def fleet(n):
    for i in range(n):
        dc, role = i % DCS, (i // DCS) % ROLES
        name = f"host{i:06d}.dc{dc}.example.com"
        yield i, name, f"dc{dc}_role{role}", dc, role

def ini(n, path):
    leaves = {}
    for i, name, leaf, dc, role in fleet(n):
        owner = f"team{role}"
        crit = ("low", "medium", "high", "critical")[i % 4]
        leaves.setdefault(leaf, []).append(
            f"{name} ansible_host=10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} "
            f"criticality={crit} owner={owner} rack=r{i % 40}")
    with open(path, "w") as f:
        f.write("[WEB_EXCLUDED]\nhost000000.dc0.example.com\n\n")
        for leaf, lines in leaves.items():
            f.write(f"[{leaf}]\n" + "\n".join(lines) + "\n\n")
            f.write(f"[{leaf}:vars]\nleaf_var={leaf}\nntp_server=ntp.{leaf}.example.com\n\n")
        for dc in range(DCS):
            f.write(f"[dc{dc}:children]\n" + "\n".join(f"dc{dc}_role{r}" for r in range(ROLES)) + "\n\n")
            f.write(f"[dc{dc}:vars]\ndc=dc{dc}\n\n")
        for r in range(ROLES):
            name = "role_web" if r == 0 else f"role{r}"
            f.write(f"[{name}:children]\n" + "\n".join(f"dc{d}_role{r}" for d in range(DCS)) + "\n\n")
        f.write("[all:vars]\nansible_user=ops\npatch_window=sun-02\n")

def yaml(n, path):
    leaves = {}
    for i, name, leaf, dc, role in fleet(n):
        leaves.setdefault((dc, leaf), []).append((i, name, role))
    with open(path, "w") as f:
        f.write("all:\n  vars:\n    ansible_user: ops\n    patch_window: sun-02\n  children:\n")
        for dc in range(DCS):
            f.write(f"    dc{dc}:\n      vars:\n        dc: dc{dc}\n      children:\n")
            for (d, leaf), hosts in leaves.items():
                if d != dc:
                    continue
                f.write(f"        {leaf}:\n          vars:\n            leaf_var: {leaf}\n          hosts:\n")
                for i, name, role in hosts:
                    f.write(f"            {name}:\n              ansible_host: 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n"
                            f"              criticality: {('low', 'medium', 'high', 'critical')[i % 4]}\n"
                            f"              owner: team{role}\n")

ini(ini_n, f"{work}/hosts.ini")
yaml(yaml_n, f"{work}/hosts.yml")
PY

# Runs patchbook with the arguments given; prints wall s, CPU s and peak RSS MB.
measure() {
  local label=$1
  shift
  local t0 t1
  t0=$(date +%s.%N)
  if ! /usr/bin/time -f '%U %S %M' -o "$work/time" "$pb" --config "$work/patchbook.toml" \
    --state-dir "$work/state" "$@" >"$work/out" 2>"$work/err"; then
    echo "inventory.sh: $label failed:" >&2
    tail -5 "$work/err" >&2
    exit 1
  fi
  t1=$(date +%s.%N)
  read -r user sys rss <"$work/time"
  printf '| %-44s | %8.2f s | %8.2f s | %7.0f MB | %7d |\n' "$label" \
    "$(echo "$t1 - $t0" | bc)" "$(echo "$user + $sys" | bc)" "$(echo "$rss / 1024" | bc)" \
    "$(wc -l <"$work/out")"
}

echo "inventory benchmark: $(nproc) cores, $(date -u +%Y-%m-%d), profile $profile"
echo "INI $ini_hosts hosts ($(du -h "$work/hosts.ini" | cut -f1)), YAML $yaml_hosts hosts ($(du -h "$work/hosts.yml" | cut -f1))"
echo
echo '| what                                         |     wall |      CPU |   peak RSS | lines out |'
echo '|---|---:|---:|---:|---:|'
measure "INI $ini_hosts: inventory list" -i "$work/hosts.ini" inventory list
measure "INI $ini_hosts: inventory list --json" -i "$work/hosts.ini" --json inventory list
measure "INI $ini_hosts: inventory graph" -i "$work/hosts.ini" inventory graph
measure "YAML $yaml_hosts: inventory list" -i "$work/hosts.yml" inventory list
measure "YAML $yaml_hosts: inventory list --json" -i "$work/hosts.yml" --json inventory list
