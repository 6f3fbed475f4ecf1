"""Build hook: ship the .proto sources and code generated from them inside the wheel.

Metadata lives in setup.cfg. The generated code carries the fingerprint of the sources it was
built from, so the installed daemon can prove at import time that the two still agree.
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProto(build_py):
    def run(self):
        super().run()
        here = Path(__file__).resolve().parent
        # Load codegen by path: importing the quantix.proto package would generate into a cache.
        spec = importlib.util.spec_from_file_location("_quantix_codegen", here / "quantix/proto/codegen.py")
        codegen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(codegen)

        target = Path(self.build_lib) / "quantix" / "proto"
        sources = target / "sources"
        if sources.exists():
            shutil.rmtree(sources)
        for rel in codegen.PROTO_FILES:
            dest = sources / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(here / "proto" / rel, dest)
        codegen.generate(sources, target / "_generated")


setup(cmdclass={"build_py": BuildWithProto})
