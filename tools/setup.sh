#!/usr/bin/env bash
# Installs what gridbpf needs on a Debian 12 machine and mounts the BPF-related filesystems.
# Idempotent: every step checks first, so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "gridbpf setup: must run as root (apt, mounts, BPF)" >&2; exit 1; }

APT_PACKAGES=(clang llvm libbpf-dev bpftool iproute2 ethtool curl nginx libnginx-mod-http-dav-ext
              wrk openjdk-17-jdk-headless tshark procps gcc libc6-dev
              haproxy nftables    # lb benchmark baselines
              bird2               # lb: BGP speaker of the balancer nodes and the lab router
              openssl util-linux  # trace tests: certificates for HTTPS servers, setpriv
              tomcat10 jetty9 davix  # Java TLS agent tests: JVM HTTPS servers, WebDAV client
              gfal2-util-scripts gfal2-plugin-http gfal2-plugin-file python-is-python3 e2fsprogs
              # ^ checksum tests: the grid's client (gfal-copy, gfal-sum), scratch ext4 in a loop file
              prometheus)         # packaging tests: a real Prometheus and promtool
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "gridbpf setup: apt installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts nginx on install; our lab runs its own instances.
  systemctl disable --now nginx >/dev/null 2>&1 || service nginx stop >/dev/null 2>&1 || true
  for svc in tomcat10 jetty9; do   # likewise: the Java tests start private instances
    systemctl disable --now "$svc" >/dev/null 2>&1 || service "$svc" stop >/dev/null 2>&1 || true
  done
  # ... and BIRD: gridbpf lb run starts its own, per balancer instance
  systemctl disable --now bird >/dev/null 2>&1 || service bird stop >/dev/null 2>&1 || true
  # ... and Prometheus: the packaging tests start their own on a free port
  # (disable works without a running systemd; stop then through whichever init there is)
  systemctl disable prometheus >/dev/null 2>&1 || true
  systemctl stop prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
stamp=.stamp-pip
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$PY" -c 'import gridbpf' 2>/dev/null; then
  echo "gridbpf setup: pip installing gridbpf[test]"
  "$PY" -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v -e '^WARNING: Running pip as' -e 'is ignored: it is neither' || true
  "$PY" -c 'import gridbpf' && touch "$stamp"
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug || true
exit 0
