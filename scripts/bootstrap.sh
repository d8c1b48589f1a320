#!/usr/bin/env bash
# Idempotent set-up of a (fresh) Debian machine for zfast, as root:
# apt packages, kernel headers for BCC, bpffs/tracefs, the project venv.
# Quiet and fast when everything is already in place; prints a short line
# for each step it actually has to do.
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
VENV="$REPO/.venv"
SYS_PY=/usr/bin/python3
STAMP="$VENV/.zfast-setup.sha256"

say() { echo "zfast bootstrap: $*" >&2; }
die() { echo "zfast bootstrap: ERROR: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (XDP, namespaces and apt need it); try: sudo $0"
[[ -f /etc/debian_version ]] && command -v apt-get >/dev/null && command -v dpkg-query >/dev/null \
    || die "needs a Debian-like system (apt-get, dpkg-query); this is not one"

# Two runs at once (e.g. a test run and a demo) must not race on apt or pip.
LOCKDIR=/run/lock; [[ -d $LOCKDIR ]] || LOCKDIR=/tmp
exec 9>"$LOCKDIR/zfast-bootstrap.lock"
flock 9

# --- apt packages -------------------------------------------------------------
ARCH="$(dpkg --print-architecture)"
PKGS=(python3-bpfcc libbpfcc libbpf1 "linux-headers-cloud-$ARCH" bpftool iproute2 nftables
      ethtool python3-venv python3-pip tcpdump iperf3
      iputils-ping procps    # ping (tests) and sysctl (netns set-up)
      etcd-server etcd-client   # the shared store (store: {kind: etcd}) and its tests
      haproxy python3-acme      # the routing service: L7 proxy and ACME client library
      pebble wrk openssl curl)  # its tests: an ACME test server, a steady HTTP load

# One dpkg-query for all: it prints "ii" for installed packages and nothing
# (exit 1) for unknown ones, so anything not listed as "ii" is missing.
declare -A installed=()
while read -r status pkg; do
    if [[ $status == ii ]]; then installed[$pkg]=1; fi
done < <(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "${PKGS[@]}" 2>/dev/null || true)
missing=()
for p in "${PKGS[@]}"; do [[ -n ${installed[$p]:-} ]] || missing+=("$p"); done

if ((${#missing[@]})); then
    say "installing apt packages: ${missing[*]} ..."
    log="$(mktemp)"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "apt-get failed (full log: $log)"
    fi
    rm -f "$log"
    # The routing service runs its own haproxy per router namespace, never the distro's unit.
    if command -v systemctl >/dev/null && systemctl is-enabled haproxy >/dev/null 2>&1; then
        systemctl disable --now haproxy >/dev/null 2>&1 || true
    fi
fi

# --- kernel headers for BCC ---------------------------------------------------
# The running kernel may ship no modules/headers; BCC only needs *some* headers
# at /lib/modules/$(uname -r)/{build,source}. Keep a link that still resolves.
newest() { ls -d "$@" 2>/dev/null | sort -V | tail -n 1; }
KDIR="/lib/modules/$(uname -r)"
hdr_build="$(newest /usr/src/linux-headers-*-cloud-"$ARCH")"
[[ -n $hdr_build ]] || die "no /usr/src/linux-headers-*-cloud-$ARCH after installing linux-headers-cloud-$ARCH"
hdr_source="${hdr_build%-cloud-"$ARCH"}-common"
[[ -d $hdr_source ]] || hdr_source="$(newest /usr/src/linux-headers-*-common)"
[[ -n $hdr_source ]] || die "no /usr/src/linux-headers-*-common"
link_headers() {  # name target
    local l="$KDIR/$1"
    [[ -d $l ]] && return 0             # existing dir or link that resolves: leave it
    say "linking $l -> $2"
    mkdir -p "$KDIR"
    ln -sfn "$2" "$l"
}
link_headers build "$hdr_build"
link_headers source "$hdr_source"

# --- bpffs and tracefs --------------------------------------------------------
if ! mountpoint -q /sys/fs/bpf; then
    say "mounting bpffs at /sys/fs/bpf"
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf"
fi
# zfast pins its maps here: `ip netns exec` hides /sys/fs/bpf (it mounts a new /sys),
# /run stays shared, so nodes run in namespaces still find their pins.
if ! mountpoint -q /run/zfast/bpffs; then
    say "mounting bpffs at /run/zfast/bpffs"
    mkdir -p /run/zfast/bpffs
    mount -t bpf bpf /run/zfast/bpffs || die "cannot mount bpffs at /run/zfast/bpffs"
fi
# tracefs is only needed by BCC tracing helpers (kprobes, trace_pipe): warn, don't fail.
if [[ ! -d /sys/kernel/debug/tracing/events ]] && ! mountpoint -q /sys/kernel/tracing; then
    say "mounting tracefs at /sys/kernel/tracing"
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null \
        || say "warning: cannot mount tracefs (only BCC tracing needs it)"
fi

# --- venv -----------------------------------------------------------------------
# It must run /usr/bin/python3 and see the system site-packages: that is where
# Debian's python3-bpfcc (module `bcc`) lives.
venv_ok() {
    [[ -x $VENV/bin/python && -f $VENV/pyvenv.cfg ]] || return 1
    [[ $(readlink -f "$VENV/bin/python") == "$(readlink -f "$SYS_PY")" ]] || return 1
    grep -Eq '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg"
}
if ! venv_ok; then
    if [[ -e $VENV ]]; then say "recreating $VENV (made by another interpreter or broken)"
    else say "creating $VENV"; fi
    rm -rf "$VENV"
    "$SYS_PY" -m venv --system-site-packages "$VENV" || die "cannot create venv (is python3-venv installed?)"
fi

# Reinstall only when pyproject.toml changed or zfast does not import from this
# checkout (-I: the current directory must not make it importable by accident).
want_hash="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
have_hash="$(cat "$STAMP" 2>/dev/null || true)"
if [[ $want_hash != "$have_hash" ]] || ! (cd / && "$VENV/bin/python" -I -c "
import os, sys, zfast
sys.exit(os.path.dirname(os.path.realpath(zfast.__file__)) != os.path.realpath('$REPO/zfast'))
") >/dev/null 2>&1; then
    say "installing zfast into $VENV (pip install -e .[test]) ..."
    log="$(mktemp)"
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[test]" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "pip install failed (full log: $log)"
    fi
    rm -f "$log"
    echo "$want_hash" >"$STAMP"
fi

# --- bytecode ---------------------------------------------------------------------
# An editable install writes no .pyc, and with PYTHONDONTWRITEBYTECODE set (CI images,
# some containers) Python never does: every `zfast up` would compile zfast's modules from
# source, ~0.1 s of its start. compileall writes them (a stale one is only recompiled
# in memory: Python checks the source's mtime), and only what changed since the last run.
"$VENV/bin/python" -m compileall -q "$REPO/zfast" >/dev/null || die "cannot compile zfast's bytecode"

# --- zfast on PATH ----------------------------------------------------------------
if [[ $(readlink /usr/local/bin/zfast 2>/dev/null || true) != "$VENV/bin/zfast" ]]; then
    say "linking /usr/local/bin/zfast -> $VENV/bin/zfast"
    ln -sfn "$VENV/bin/zfast" /usr/local/bin/zfast
fi
