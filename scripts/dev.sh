#!/usr/bin/env bash
# One entry point for newcomers and CI:
#   scripts/dev.sh run    install what is needed, then run the daemon on libvirt's test driver
#   scripts/dev.sh test   install what is needed (plus libvirtd + QEMU for the integration tier), run every test
# Idempotent: a second run reuses the apt packages and the venv, and skips `pip install` while
# nothing it depends on has changed (see install_fingerprint).
# Environment: QUANTIX_VENV (default .venv), PYTHON (python3), QUANTIX_KEEP_LIBVIRTD=1 (test: leave
# a libvirtd this script started running), QUANTIX_QEMU_LOG_DIR (/var/log/libvirt/qemu).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV=${QUANTIX_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
STAMP=$VENV/.quantix-install-stamp
QEMU_LOG_DIR=${QUANTIX_QEMU_LOG_DIR:-/var/log/libvirt/qemu}
LIBVIRTD_PID=

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "== apt-get install ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup() {
  local pkgs=(libvirt-dev pkg-config gcc)
  if [ ! -x "$VENV/bin/python" ]; then  # what creating the venv and building libvirt-python need
    "$PY" -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
    [ -f "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || pkgs+=(python3-dev)
  fi
  apt_install "${pkgs[@]}" "$@"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip wheel
  fi
  local want
  want=$(install_fingerprint)
  if [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
    echo "== $VENV is up to date (pip install skipped)"
    return 0
  fi
  echo "== pip install .[test]"
  set +e
  "$VENV/bin/pip" install -q --disable-pip-version-check ".[test]" 2>&1 | grep -v '^WARNING: Location'
  local rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" = 0 ] || { echo "== pip install failed (exit $rc)" >&2; exit "$rc"; }
  echo "$want" > "$STAMP"
}

# What `pip install .[test]` depends on: the build files, the .proto sources, and (the install is
# not editable: the venv holds a copy) every file of the package tree. Any change means install.
install_fingerprint() {
  {
    "$VENV/bin/python" -c 'import sys; print(sys.version)'
    find setup.cfg pyproject.toml setup.py proto quantix twisted -type f \
      ! -path '*/__pycache__/*' ! -path 'quantix/proto/_generated/*' ! -name '*.pyc' -print0 |
      sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}

# A real libvirtd with QEMU (TCG) for the integration tier; only as root, only if not already up.
start_libvirtd() {
  if virsh -q -c qemu:///system uri >/dev/null 2>&1; then return 0; fi
  if [ "$(id -u)" != 0 ]; then echo "== not root: the real-libvirtd tier will skip"; return 0; fi
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
  # root-owned QEMU avoids a capability re-probe per start; file stdio needs no virtlogd.
  grep -q '^stdio_handler' /etc/libvirt/qemu.conf 2>/dev/null ||
    printf 'user = "root"\ngroup = "root"\nstdio_handler = "file"\n' >> /etc/libvirt/qemu.conf
  LIBVIRTD_LOG=${LIBVIRTD_LOG:-$(mktemp -d)/libvirtd}
  printf 'log_filters="1:qemu 1:libvirt 3:object 3:json 3:event 3:util 3:rpc"\nlog_outputs="3:file:%s.log"\n' \
    "$LIBVIRTD_LOG" > "$LIBVIRTD_LOG.conf"
  # tini -s reaps QEMU promptly; this machine's PID 1 reaps orphans only once a second.
  setsid tini -s -- /usr/sbin/libvirtd --config "$LIBVIRTD_LOG.conf" > "$LIBVIRTD_LOG.out" 2>&1 &
  LIBVIRTD_PID=$!  # only this one is ever stopped (stop_own_libvirtd); a shared one is left alone
  for _ in $(seq 200); do virsh -q -c qemu:///system uri >/dev/null 2>&1 && break; sleep 0.05; done
  virsh -q -c qemu:///system uri >/dev/null
  echo "== libvirtd started (pid $LIBVIRTD_PID, log $LIBVIRTD_LOG.log)"
}

# When the tests end: stop the libvirtd this invocation started (never one that was already
# answering: LIBVIRTD_PID is only set by start_libvirtd), unless QUANTIX_KEEP_LIBVIRTD=1.
stop_own_libvirtd() {
  [ -n "$LIBVIRTD_PID" ] || return 0
  if [ "${QUANTIX_KEEP_LIBVIRTD:-0}" = 1 ]; then
    echo "== leaving libvirtd running (pid $LIBVIRTD_PID, QUANTIX_KEEP_LIBVIRTD=1)"
    return 0
  fi
  echo "== stopping the libvirtd started for the tests (pid $LIBVIRTD_PID)"
  kill -TERM "$LIBVIRTD_PID" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$LIBVIRTD_PID" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$LIBVIRTD_PID" 2>/dev/null || true
}

# QEMU's per-VM logs of this run's test domains: their names carry this run's tag
# (tests/libvirtd.py NAME_PREFIX), so logs of other runs on a shared libvirtd are left alone.
remove_test_vm_logs() {
  local tag=$1
  [ -d "$QEMU_LOG_DIR" ] || return 0
  local logs=("$QEMU_LOG_DIR"/qtx-test-"$tag"-*.log)
  [ -e "${logs[0]}" ] || return 0
  echo "== removing ${#logs[@]} QEMU log(s) of this run's test VMs from $QEMU_LOG_DIR"
  rm -f -- "${logs[@]}"
}

after_tests() {
  remove_test_vm_logs "$QUANTIX_TEST_RUN"
  stop_own_libvirtd
}

main() {
case "${1:-}" in
  run)
    shift
    setup
    STATE=${QUANTIX_STATE_DIR:-$ROOT/.state}
    mkdir -p "$STATE"
    # The test driver is the embedded default here; flags given after "run" override it.
    exec "$VENV/bin/twistd" -n --pidfile= quantix-node --libvirt-uri test:///default --state-dir "$STATE" \
      --agent-socket-dir "$STATE/agents" "$@"
    ;;
  test)
    shift
    setup libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils libvirt-clients tini openvswitch-switch curl
    # Test domains are named qtx-test-<tag>-...; the tag tells this run's QEMU logs apart.
    export QUANTIX_TEST_RUN=${QUANTIX_TEST_RUN:-r$(date +%s | tail -c 6)$$}
    trap after_tests EXIT
    start_libvirtd
    export PYTHONPATH=$ROOT
    log=$(mktemp)
    set +e
    "$VENV/bin/python" -m twisted.trial "${@:-tests}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    # trial's own summary ("PASSED (successes=N)") in the plain "N passed, N failed" form.
    "$VENV/bin/python" - "$log" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
ran = re.findall(r"^Ran (\d+) tests?", text, re.M)
summary = re.findall(r"^(?:PASSED|FAILED) \((.*)\)$", text, re.M)
if ran and summary:
    counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", summary[-1]))
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    print(f"tests: {counts.get('successes', 0)} passed, {failed} failed, {counts.get('skips', 0)} skipped")
PY
    rm -f "$log"
    exit "$rc"
    ;;
  install-fingerprint)  # for tests: what the stamp must say for `run` to skip pip install
    install_fingerprint
    ;;
  *)
    echo "usage: $0 run [twistd quantix-node flags] | test [trial test names]" >&2
    exit 2
    ;;
esac
}

# Sourced (tests call the functions above one by one) or run.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
