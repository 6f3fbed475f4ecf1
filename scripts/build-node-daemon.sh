#!/usr/bin/env bash
# Build an installable wheel of the node daemon with freshly generated protobuf code.
#   scripts/build-node-daemon.sh [--debug]
# --debug keeps the build tree and shows every build step.
set -euo pipefail
cd "$(dirname "$0")/.."
DEBUG=0
[ "${1:-}" = "--debug" ] && DEBUG=1
VENV=${QUANTIX_VENV:-$PWD/.venv}
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV"; "$VENV/bin/pip" install -q --upgrade pip wheel; }
"$VENV/bin/pip" install -q "grpcio-tools==1.85.1" "mypy-protobuf>=3.6" 2>&1 | grep -v '^WARNING: Location' || true

echo "== regenerating protobuf code"
PYTHONPATH=$PWD "$VENV/bin/python" -m quantix.proto.cli --regenerate
PYTHONPATH=$PWD "$VENV/bin/python" -m quantix.proto.cli --check

echo "== building the wheel"
rm -rf dist
if [ $DEBUG = 1 ]; then
  "$VENV/bin/pip" wheel -v --no-deps --no-clean -w dist .
else
  "$VENV/bin/pip" wheel -q --no-deps -w dist . 2>&1 | grep -v '^WARNING: Location' || true
  rm -rf build ./*.egg-info
fi
WHEEL=$(ls dist/quantix_node-*.whl)
cat <<EOT

Built $WHEEL (protobuf code generated at build time, fingerprint $(unzip -p "$WHEEL" quantix/proto/_generated/FINGERPRINT | cut -c1-12)).

Install on a hypervisor host:
  apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc python3-venv python3-dev
  python3 -m venv /opt/quantix && /opt/quantix/bin/pip install $(basename "$WHEEL")
  install -m 644 etc/limiquantix/node.yaml /etc/limiquantix/node.yaml
  install -m 644 etc/systemd/quantix-node.service /etc/systemd/system/ && systemctl daemon-reload
  systemctl enable --now quantix-node
Check: /opt/quantix/bin/quantix-proto --check && /opt/quantix/bin/twistd quantix-node --help
EOT
