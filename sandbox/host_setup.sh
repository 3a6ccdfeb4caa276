#!/usr/bin/env bash
# One-time host set-up for the sandboxes, as root, on a Linux host without a Docker engine:
#   - installs bubblewrap and setpriv (util-linux) for the local backend and the fork server,
#     and checks that the pids and memory cgroup controllers (v1 or v2) are there;
#   - installs podman + runc (the docker backend, through Podman's Docker-compatible API);
#   - writes a containers.conf for the service (runc, cgroupfs, modest default ulimits);
#   - starts `podman system service` on a unix socket in the background unless one answers;
#   - builds the base image(s) if missing (python -m launch.images).
# Idempotent: a second run only checks (about a second). Prints the DOCKER_HOST to export.
#
#   sudo sandbox/host_setup.sh [--debian]   # --debian: also build cwm-rl/debian:bookworm
#   sudo sandbox/host_setup.sh --local      # only what the local backend needs, no podman
#   eval "$(sandbox/host_setup.sh --print-env)"   # only print the export line
#
# Environment: CWM_RL_PODMAN_SOCKET (default /run/podman/podman.sock), PYTHON (default: the
# repository's .venv/bin/python if it has docker-py; otherwise images are imported with the
# podman CLI and python3), CWM_RL_CONF_DIR (default /etc/cwm-rl).
set -euo pipefail

SOCKET="${CWM_RL_PODMAN_SOCKET:-/run/podman/podman.sock}"
CONF_DIR="${CWM_RL_CONF_DIR:-/etc/cwm-rl}"
CONF="$CONF_DIR/containers.conf"
LOG=/var/log/cwm-rl-podman.log
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE_ARGS=()
LOCAL_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --debian) IMAGE_ARGS+=(--debian) ;;
        --local) LOCAL_ONLY=1 ;;
        --print-env) echo "export DOCKER_HOST=unix://$SOCKET"; exit 0 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "host_setup.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

say() { echo "host_setup: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    say "must run as root (it installs packages and serves Podman as root)"; exit 1
fi

# 1. Packages, only when something is missing (the local backend's error messages name these).
packages=()
command -v bwrap >/dev/null || packages+=(bubblewrap)
command -v setpriv >/dev/null || packages+=(util-linux)
if ((!LOCAL_ONLY)); then
    command -v podman >/dev/null || packages+=(podman)
    command -v runc >/dev/null || packages+=(runc)
    command -v curl >/dev/null || packages+=(curl)
    if [[ " ${IMAGE_ARGS[*]-} " == *" --debian "* ]] && ! command -v mmdebstrap >/dev/null; then
        packages+=(mmdebstrap)
    fi
fi
if ((${#packages[@]})); then
    if ! command -v apt-get >/dev/null; then
        say "please install ${packages[*]} with this system's package manager"; exit 1
    fi
    say "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

# The local backend's cgroups (sandbox/cgroups.py): pids and memory, v1 or v2. Only a
# check: the sandboxes make their groups themselves (this shell's group stands in for the run's).
check_cgroups() {
    local root=/sys/fs/cgroup c own available
    if [[ -f $root/cgroup.controllers ]]; then
        own=$(awk -F: '$1 == "0" { print $3 }' /proc/self/cgroup)
        available=" $(cat "$root${own%/}/cgroup.controllers" 2>/dev/null) "
        for c in pids memory; do
            if [[ $available != *" $c "* ]]; then
                say "warning: cgroup v2 controller $c is not enabled for group $own (enable it in" \
                    "the parent's cgroup.subtree_control); the local sandbox refuses to run without it"
            fi
        done
    else
        for c in pids memory; do
            if [[ ! -e $root/$c/cgroup.procs ]]; then
                say "warning: no cgroup v1 $c controller at $root/$c (mount -t cgroup -o $c cgroup" \
                    "$root/$c, or boot with cgroup v2); the local sandbox refuses to run without it"
            fi
        done
    fi
}
check_cgroups
if ((LOCAL_ONLY)); then
    say "local backend ready: $(command -v bwrap), $(command -v setpriv)"
    exit 0
fi

# 2. containers.conf for the service (rewritten each run so edits here take effect).
mkdir -p "$CONF_DIR"
cat > "$CONF.tmp" <<'EOF'
# Written by cwm-rl sandbox/host_setup.sh: the Podman service behind the docker sandbox.
[containers]
# Podman would otherwise give containers the service's own (huge) limits.
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
# No systemd or journald on many CI hosts and containers.
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
mv "$CONF.tmp" "$CONF"

# 3. The API service, unless one already answers on the socket.
ping() { curl -sf --max-time 5 --unix-socket "$SOCKET" http://d/_ping >/dev/null 2>&1; }
# a service started from a directory deleted since answers pings, but conmon cannot start
# containers ("Failed to get working directory"): stop it and start a new one
for pid in $(pgrep -f "podman system service .*unix://$SOCKET" || true); do
    if [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == *" (deleted)" ]]; then
        say "the podman service (pid $pid) runs in a deleted directory: restarting it"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
done
if ping; then
    say "podman service already answers on $SOCKET"
else
    rm -f "$SOCKET"
    mkdir -p "$(dirname "$SOCKET")"
    say "starting podman system service on $SOCKET (log: $LOG)"
    # from /, so that the service (and every conmon it starts) never runs in a directory that
    # may be deleted later, such as the checkout that ran this script
    (
        cd /
        CONTAINERS_CONF="$CONF" setsid nohup podman system service --time=0 "unix://$SOCKET" \
            >>"$LOG" 2>&1 < /dev/null &
    )
    for _ in $(seq 100); do ping && break; sleep 0.1; done
    if ! ping; then
        say "the podman service did not answer on $SOCKET; see $LOG"; tail -20 "$LOG" >&2; exit 1
    fi
fi

# 4. Base images: through the API with docker-py where a Python has it, else (a fresh clone
# before `make install`) with the podman CLI; the recipes live in sandbox/images.py.
export DOCKER_HOST="unix://$SOCKET" CONTAINERS_CONF="$CONF"
if [[ -z "${PYTHON:-}" && -x "$REPO/.venv/bin/python" ]] \
    && "$REPO/.venv/bin/python" -c "import docker" 2>/dev/null; then
    PYTHON="$REPO/.venv/bin/python"
fi
if [[ -n "${PYTHON:-}" ]]; then
    (cd "$REPO" && "$PYTHON" -m launch.images --docker-host "$DOCKER_HOST" "${IMAGE_ARGS[@]}") >&2
else
    (cd "$REPO" && python3 -m launch.images --podman-cli "${IMAGE_ARGS[@]}") >&2
fi

echo "export DOCKER_HOST=unix://$SOCKET"
