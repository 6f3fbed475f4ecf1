#!/usr/bin/env bash
# Build an installable wheel of the node daemon with freshly generated protobuf code.
#   scripts/build-node-daemon.sh [--debug]
# --debug keeps the build tree and shows every build step.
# QUANTIX_DIST (default dist/) is where the wheel goes; QUANTIX_STEPS_ROOT prefixes every host
# path in the printed install steps (tests run them against a temporary root).
set -euo pipefail
cd "$(dirname "$0")/.."
DIST=$(realpath -m "${QUANTIX_DIST:-dist}")
R=${QUANTIX_STEPS_ROOT:-}
DEBUG=0
[ "${1:-}" = "--debug" ] && DEBUG=1
VENV=${QUANTIX_VENV:-$PWD/.venv}
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV"; "$VENV/bin/pip" install -q --upgrade pip wheel; }
"$VENV/bin/pip" install -q "grpcio-tools==1.85.1" "mypy-protobuf>=3.6" 2>&1 | grep -v '^WARNING: Location' || true

echo "== regenerating protobuf code"
PYTHONPATH=$PWD "$VENV/bin/python" -m quantix.proto.cli --regenerate
PYTHONPATH=$PWD "$VENV/bin/python" -m quantix.proto.cli --check

echo "== building the wheel"
rm -rf "$DIST"
if [ $DEBUG = 1 ]; then
  "$VENV/bin/pip" wheel -v --no-deps --no-clean -w "$DIST" .
else
  "$VENV/bin/pip" wheel -q --no-deps -w "$DIST" . 2>&1 | grep -v '^WARNING: Location' || true
  rm -rf build ./*.egg-info
fi
WHEEL=$(ls "$DIST"/quantix_node-*.whl)
# Every indented line below is one command, runnable as printed from any directory (absolute
# paths); tests/test_build_steps.py runs each of them against a temporary root.
cat <<EOT

Built $WHEEL (protobuf code generated at build time, fingerprint $(unzip -p "$WHEEL" quantix/proto/_generated/FINGERPRINT | cut -c1-12)).

Install on a hypervisor host, as root (an existing node.yaml is kept):
  apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc python3-venv python3-dev
  python3 -m venv $R/opt/quantix
  $R/opt/quantix/bin/pip install $WHEEL
  [ -e $R/etc/limiquantix/node.yaml ] || install -D -m 644 $PWD/etc/limiquantix/node.yaml $R/etc/limiquantix/node.yaml
  install -D -m 644 $PWD/etc/systemd/quantix-node.service $R/etc/systemd/system/quantix-node.service
  systemctl daemon-reload
  systemctl enable --now quantix-node
Check:
  $R/opt/quantix/bin/quantix-proto --check && $R/opt/quantix/bin/twistd quantix-node --version
EOT
