#!/usr/bin/env bash
# Prepare this machine for the bcc/eBPF probes (see DESIGN and notes/ebpf.md): Debian's bcc,
# kernel headers linked under /lib/modules/$(uname -r), tracefs mounted. Idempotent; needs root.
# Never fatal: on failure it says why, and the eBPF tests skip (or fail under REQUIRE_EBPF=1).
set -u
if [ "$(id -u)" != 0 ]; then
  echo "prepare-ebpf: not root; eBPF tests will skip" >&2
  exit 0
fi
need=()
dpkg -s python3-bpfcc >/dev/null 2>&1 || need+=(python3-bpfcc)
ls -d /usr/src/linux-headers-*-amd64 >/dev/null 2>&1 || need+=(linux-headers-amd64)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/prepare-ebpf.log 2>&1 \
    || { apt-get update -q >>/tmp/prepare-ebpf.log 2>&1 \
         && apt-get install -y -q --no-install-recommends "${need[@]}" >>/tmp/prepare-ebpf.log 2>&1; } \
    || { echo "prepare-ebpf: apt-get install ${need[*]} failed (see /tmp/prepare-ebpf.log)" >&2; exit 0; }
fi
K=/lib/modules/$(uname -r)
build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
if [ -n "$build" ] && [ -n "$common" ]; then
  mkdir -p "$K"
  [ -e "$K/build" ] || ln -sfn "$build" "$K/build"
  [ -e "$K/source" ] || ln -sfn "$common" "$K/source"
else
  echo "prepare-ebpf: no kernel headers under /usr/src" >&2
fi
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null \
  || echo "prepare-ebpf: could not mount tracefs at /sys/kernel/tracing" >&2
echo "prepare-ebpf: ready (bcc: $(dpkg-query -W -f='${Version}' python3-bpfcc 2>/dev/null), headers: ${build:-none})"
