#!/usr/bin/env python3
"""Workers benchmark (not a test): one rollout on N hosts of the `sim` transport,
on run files, on the PostgreSQL store in one process, and shared by a coordinator
with 1 and with 4 `patchbook worker` processes, all against one private PostgreSQL
server this script starts (initdb + pg_ctl in a temp folder, Unix socket only,
the server's default durability) and stops.

Prints, per setup: wall time, CPU of patchbook's processes and of the database
server, CPU and journal bytes per host, and the ratios that matter: the store's
cost per host (each PostgreSQL setup against run files) and 4 workers against
1. Needs root (the server runs as the `postgres` user) and `.ci/setup`.

The run-file setup runs at `--files-hosts` (default: `--hosts`) and the store's
overhead is taken per host between the two sizes; `--skip-files` leaves it out.

Usage: benches/workers.py [--hosts 100000] [--workers 1,4] [--bin PATH]
                          [--files-hosts N] [--skip-files]
"""

import argparse
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / "scripts/bench-patch.rhai"


def server_bin():
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name))
    if not found:
        sys.exit("workers bench: no /usr/lib/postgresql/*/bin/initdb: run .ci/setup")
    return found[-1].parent


class Server:
    """A private PostgreSQL server in `dir`, as the postgres user."""

    def __init__(self, base):
        # max_connections: a worker opens two connections per slot (claims, lease
        # renewals) and one for its journal; 4 workers of 50 slots need ~410.
        self.bin = server_bin()
        self.dir = base / "pg"
        self.dir.mkdir()
        pw = pwd.getpwnam("postgres")
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.as_postgres("initdb", "-D", str(self.dir / "data"), "-U", "patchbook",
                         "--auth=trust", "--no-sync")
        self.as_postgres("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"),
                         "-w", "-o", f"-k {self.dir} -c listen_addresses='' -c max_connections=500",
                         "start")

    def as_postgres(self, tool, *args):
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def database(self, name):
        self.as_postgres("createdb", "-h", str(self.dir), "-U", "patchbook", name)
        host = urllib.parse.quote(str(self.dir), safe="")
        return f"postgresql://patchbook@{host}/{name}"

    def psql(self, db, sql):
        out = subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "psql"),
                              "-h", str(self.dir), "-U", "patchbook", "-d", db, "-At", "-c", sql],
                             check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def cpu(self):
        """CPU seconds of the postmaster, its live children and its reaped ones."""
        pid = int((self.dir / "data/postmaster.pid").read_text().split()[0])
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            f = stat[stat.rindex(")") + 2:].split()
            ppid = int(f[1])
            if int(p.name) == pid:
                total += sum(int(x) for x in f[11:15])  # utime stime cutime cstime
            elif ppid == pid:
                total += int(f[11]) + int(f[12])
        return total / tick

    def stop(self):
        self.as_postgres("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")


def project(base, hosts, name="project"):
    """A project folder with `hosts` sim hosts and the fleet benchmark's playbook."""
    sub = base / name
    sub.mkdir()
    deb = sub / "acme-agent_1.0.1_all.deb"
    deb.write_text("a stand-in package: the sim transport only hashes it\n")
    sha = hashlib.sha256(deb.read_bytes()).hexdigest()
    with open(sub / "inventory.toml", "w") as inv:
        inv.write(f'[groups.all]\nvars = {{ sim_latency_ms = 0, bench_deb = "{deb}", '
                  f'bench_sha256 = "{sha}" }}\n')
        for i in range(1, hosts + 1):
            inv.write(f'\n[hosts.s{i:06}]\ntransport = "sim"\n')
    (sub / "patchbook.toml").write_text(
        'inventory = ["inventory.toml"]\n'
        f'stdlib = "{ROOT}/stdlib"\nplaybooks = "{ROOT}/scripts"\n'
        f'trusted_sources = ["{sub}"]\n\n'
        "[limits]\nmax_map_size = 1000000\nmax_array_size = 1000000\n")
    return sub


def timed(tag, procs_args, env_store, cwd, logs):
    """Starts every command at once and waits for all: wall, their CPU, the largest
    peak RSS among them (each from its own wait4), and the commands that failed."""
    start = time.monotonic()
    procs = []
    for i, args in enumerate(procs_args):
        log = open(logs / f"{tag}-{args[0]}-{i}.log", "w")
        env = dict(os.environ)
        if env_store:
            env["PATCHBOOK_STORE"] = env_store
        procs.append((subprocess.Popen(args[1:], cwd=cwd, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log, args[0]))
        time.sleep(0.05)  # the coordinator first: workers wait for its run anyway
    cpu, rss, failed = 0.0, 0, []
    for p, log, name in procs:
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        cpu += ru.ru_utime + ru.ru_stime
        rss = max(rss, ru.ru_maxrss)
        log.close()
        if p.returncode != 0:
            failed.append(f"{name} exit {p.returncode} (log: {log.name})")
    return time.monotonic() - start, cpu, rss, failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=100_000)
    ap.add_argument("--workers", default="1,4")
    ap.add_argument("--bin", help="a patchbook built with --features lab (default: builds the release one)")
    ap.add_argument("--files-hosts", type=int,
                    help="hosts of the run-file setup (default: --hosts)")
    ap.add_argument("--skip-files", action="store_true", help="leave the run-file setup out")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("workers bench: run as root (the database server runs as postgres)")
    pb = a.bin
    if not pb:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--features", "lab", "--bin", "patchbook"],
                       cwd=ROOT, check=True)
        pb = str(ROOT / "target/release/patchbook")
    n = a.hosts
    nf = None if a.skip_files else (a.files_hosts or n)
    base = Path(tempfile.mkdtemp(prefix="patchbook-workers-bench."))
    os.chmod(base, 0o755)
    server = None
    rows = []
    try:
        sub = project(base, n)
        sub_files = sub if nf in (None, n) else project(base, nf, "project-files")
        logs = base / "logs"
        logs.mkdir()
        server = Server(base)

        def common(state, proj=sub):
            return [pb, "--config", str(proj / "patchbook.toml"), "--state-dir", str(base / state),
                    "--forks", "50", "-q"]

        def measure(label, db, commands, hosts=n, cwd=sub):
            url = server.database(db) if db else None
            cpu_db = server.cpu()
            wall, cpu, rss, failed = timed(db or "files", commands, url, cwd, logs)
            cpu_db = server.cpu() - cpu_db
            records = bytes_ = 0
            if db:
                got = server.psql(db, "select count(*), coalesce(sum(length(line)), 0) from records")
                records, bytes_ = (int(x) for x in got.split("|"))
            else:
                for f in (base / "file-state/runs").glob("*.jsonl"):
                    bytes_ += f.stat().st_size
                    records += sum(1 for _ in open(f, "rb"))
            row = dict(label=label, wall=wall, cpu=cpu, db=cpu_db, rss=rss, records=records,
                       bytes=bytes_, failed=failed, hosts=hosts)
            rows.append(row)
            print(f"workers bench: {label}: {wall:.1f} s wall, {cpu:.1f} s patchbook CPU, "
                  f"{cpu_db:.1f} s server CPU, {records} records"
                  + (f", FAILED: {', '.join(failed)}" if failed else ""), flush=True)
            return row

        print(f"workers bench: {n} sim hosts, patchbook {pb}", flush=True)
        if nf is None:
            print("workers bench: run files left out (--skip-files)", flush=True)
        elif nf != n:
            print(f"workers bench: run files at {nf} hosts, not {n}: the run-file store holds "
                  "a lock file descriptor per host (hard limit 20,000 here); its figures are "
                  "taken per host", flush=True)
        play = str(PLAYBOOK)
        files = None
        if nf is not None:
            files = measure(f"run, run files ({nf} hosts)", None,
                            [["run", *common("file-state", sub_files), "run", play]], nf, sub_files)
        one = measure("run, PostgreSQL store, one process", "inproc",
                      [["run", *common("inproc-state"), "run", play]])
        shared = {}
        for k in (int(x) for x in a.workers.split(",")):
            cmds = [["coordinator", *common(f"coord{k}"), "run", play, "--workers", "external"]]
            cmds += [["worker", *common(f"w{k}-{i}"), "worker", "--id", f"w{i}"] for i in range(k)]
            shared[k] = measure(f"coordinator + {k} worker{'s' if k > 1 else ''}", f"shared{k}", cmds)
    finally:
        if server:
            server.stop()
        if os.environ.get("KEEP") or any(r["failed"] for r in rows):
            print(f"workers bench: kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    def ms(r, key):
        return r[key] / r["hosts"] * 1000

    print(f"\n| setup ({n} sim hosts) | wall | hosts / s | patchbook CPU / host | server CPU / host | records / host | journal bytes / host | peak RSS of one process |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['wall']:.1f} s | {r['hosts'] / r['wall']:.0f} | {ms(r, 'cpu'):.2f} ms | "
              f"{ms(r, 'db'):.2f} ms | {r['records'] / r['hosts']:.1f} | {r['bytes'] / r['hosts']:.0f} | "
              f"{r['rss'] // 1024} MB |")
    print()
    for r in [one, *shared.values()]:
        if files:
            print(f"store overhead per host ({r['label']} − run files): "
                  f"{ms(r, 'cpu') - ms(files, 'cpu'):.2f} ms patchbook CPU, "
                  f"{ms(r, 'db'):.2f} ms server CPU, {ms(r, 'wall') - ms(files, 'wall'):.2f} ms wall")
        else:
            print(f"per host ({r['label']}, no run-file baseline): {ms(r, 'cpu'):.2f} ms patchbook CPU, "
                  f"{ms(r, 'db'):.2f} ms server CPU, {ms(r, 'wall'):.2f} ms wall")
    ks = sorted(shared)
    for k in ks[1:]:
        print(f"{k} workers ÷ {ks[0]} worker, wall: {shared[k]['wall'] / shared[ks[0]]['wall']:.2f}×")
    if any(r["failed"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
