#!/usr/bin/env bash
# Type-check quantix/ with mypy (configuration in pyproject.toml). The stubs of the generated
# protobuf code live beside it in the fingerprinted cache (or the installed wheel): point
# MYPYPATH there, generating first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QUANTIX_VENV:-$PWD/.venv}
GEN=$(PYTHONPATH=$PWD "$VENV/bin/python" -c 'from quantix.proto import generated_dir; print(generated_dir())')
MYPYPATH=$GEN exec "$VENV/bin/mypy" "$@"
