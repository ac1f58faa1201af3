# The patch job as a pyinfra deploy. The driver passes BENCH_DEB, BENCH_SHA256 and
# BENCH_BACKUPS in the environment.
import os

from pyinfra import host
from pyinfra.operations import files, server

deb = os.environ["BENCH_DEB"]
sha256 = os.environ["BENCH_SHA256"]
backups = os.environ["BENCH_BACKUPS"]
name = host.name
staged = f"/tmp/bench-{name}.deb"
archive = f"/tmp/bench-backup-{name}.tar"

server.shell(name="1. installed version", commands=["dpkg-query -W -f='${Version}' acme-agent"])
server.shell(name="2. backup (archive on the host)",
             commands=[f"tar -cf {archive} --numeric-owner -C / opt/acme"])
files.get(name="2. backup (to the controller)", src=archive, dest=f"{backups}/{name}.tar")
files.put(name="3. upload the .deb", src=deb, dest=staged, mode="600")
server.shell(name="4. SHA-256 on the host",
             commands=[f"echo '{sha256}  {staged}' | sha256sum -c --status -"])
server.shell(name="5. install", commands=[f"dpkg -i {staged}"])
server.shell(name="6. verify",
             commands=["test \"$(dpkg-query -W -f='${Version}' acme-agent)\" = 1.0.1"])
server.shell(name="7. health check", commands=["/opt/acme/agent.sh --check"])
