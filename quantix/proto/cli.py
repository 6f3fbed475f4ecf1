"""``quantix-proto``: check or regenerate the Python code generated from ``proto/``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quantix.proto import codegen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantix-proto", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", action="store_true", help="exit 1 if generated code is stale or missing")
    group.add_argument("--regenerate", action="store_true", help="generate code for the current sources")
    parser.add_argument("--proto-root", type=Path, help="proto sources (default: the package's own)")
    parser.add_argument("--out", type=Path, help="output directory (default: the fingerprint-keyed cache)")
    args = parser.parse_args(argv)
    try:
        root = args.proto_root or codegen.source_root()
        fp = codegen.fingerprint(root)
        out = args.out or codegen.cache_root() / fp
        if args.check:
            if codegen.is_current(out, fp) or (
                args.out is None and codegen.is_current(codegen.bundled_dir(), fp)
            ):
                print(f"up to date: {fp[:12]} ({root})")
                return 0
            print(
                f"stale: generated code does not match {root}; run `{codegen.FIX_COMMAND}`", file=sys.stderr
            )
            return 1
        codegen.generate(root, out)
        print(f"generated {out} from {root}")
        return 0
    except (codegen.ProtoError, OSError) as exc:
        print(f"quantix-proto: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
