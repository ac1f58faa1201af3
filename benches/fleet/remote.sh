# The whole patch job for one host as one shell script, run by the OpenSSH peer and
# the one-channel libssh2 peer over ONE exec channel. The .deb arrives on stdin, the
# backup tar leaves on stdout, everything else goes to stderr. @SHA256@ is replaced
# by the driver with the .deb's SHA-256.
set -e
# 1. installed version
dpkg-query -W -f='${Version}\n' acme-agent >&2
# 2. backup /opt/acme to the controller
tar -cf - --numeric-owner -C / opt/acme
# 3. upload the .deb
d=$(mktemp -d /tmp/bench.XXXXXXXXXX)
trap 'rm -rf "$d"' EXIT
cat >"$d/acme-agent.deb"
# 4. its SHA-256 on the host
echo "@SHA256@  $d/acme-agent.deb" | sha256sum -c --status -
# 5. install
dpkg -i "$d/acme-agent.deb" >&2
# 6. verify independently
test "$(dpkg-query -W -f='${Version}' acme-agent)" = 1.0.1
# 7. health check
/opt/acme/agent.sh --check >&2
