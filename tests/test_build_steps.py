"""``scripts/build-node-daemon.sh``: every install step it prints works on a fresh host.

The script builds the wheel and prints its steps with every host path under a temporary root
(``QUANTIX_STEPS_ROOT``); the test then runs each printed line as printed. Two commands cannot
run inside a temporary root and are stood in for by recording shims on ``PATH``: ``apt-get``
(each package name must still be one apt knows) and ``systemctl`` (the unit it enables must have
been installed). The fresh venv gets its dependencies from this checkout's venv instead of the
network, so only the wheel itself is installed by the printed ``pip install``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "build-node-daemon.sh")
VENV = os.environ.get("QUANTIX_VENV") or os.path.join(ROOT, ".venv")

SHIM = """#!/bin/sh
echo "$0 $*" >> {log}
{check}
"""
#: The apt-get stand-in fails when a package name is unknown to apt (a typo in the printed step).
APT_CHECK = (
    'for p in "$@"; do case "$p" in -*|install) ;; '
    '*) apt-cache show "$p" >/dev/null 2>&1 || exit 100;; esac; done'
)


def printed_steps(output: str) -> list[str]:
    """The indented command lines after the install heading (headings end with ':')."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Install on a hypervisor host"))
    return [line.strip() for line in lines[start + 1 :] if line.startswith("  ")]


def seed_dependencies(venv: str) -> None:
    """Point a fresh venv at this checkout's installed dependencies (not at quantix itself, so
    the printed ``pip install`` really installs the wheel) and drop its own older setuptools."""
    site = subprocess.check_output(
        [
            os.path.join(venv, "bin", "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        text=True,
    ).strip()
    for name in os.listdir(site):
        if name.startswith(("setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence")):
            path = os.path.join(site, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    deps = os.path.join(os.path.dirname(venv), "deps")
    os.makedirs(deps)
    ours = os.path.join(
        VENV, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages"
    )
    for name in os.listdir(ours):
        if not name.startswith(("quantix", "__editable__")):
            os.symlink(os.path.join(ours, name), os.path.join(deps, name))
    with open(os.path.join(site, "zz_test_deps.pth"), "w") as fh:
        fh.write(deps + "\n")
    # Twisted's own console script, as installing Twisted into the venv would have made it.
    twistd = os.path.join(venv, "bin", "twistd")
    with open(twistd, "w") as fh:
        fh.write(f"#!{venv}/bin/python\nfrom twisted.scripts.twistd import run\nrun()\n")
    os.chmod(twistd, 0o755)


class BuildStepsTests(unittest.TestCase):
    def setUp(self) -> None:
        if not os.path.exists(os.path.join(VENV, "bin", "python")):
            raise unittest.SkipTest(f"no venv at {VENV} (run scripts/dev.sh first)")
        if not shutil.which("apt-cache"):
            raise unittest.SkipTest("apt-cache is needed to check the apt-get step")

    def test_printed_steps_run_against_a_temporary_root(self):
        tmp = os.path.abspath(self.mktemp())
        root, bindir = os.path.join(tmp, "root"), os.path.join(tmp, "bin")
        os.makedirs(bindir)
        log = os.path.join(tmp, "shims.log")
        for name, check in (("apt-get", APT_CHECK), ("systemctl", "")):
            path = os.path.join(bindir, name)
            with open(path, "w") as fh:
                fh.write(SHIM.format(log=log, check=check))
            os.chmod(path, 0o755)
        # python3 on PATH is this interpreter's base, the one this checkout's venv was made from.
        os.symlink(sys._base_executable, os.path.join(bindir, "python3"))
        env = dict(
            os.environ,
            QUANTIX_VENV=VENV,
            QUANTIX_DIST=os.path.join(tmp, "dist"),
            QUANTIX_STEPS_ROOT=root,
            QUANTIX_PROTO_CACHE=os.path.join(tmp, "proto-cache"),
            PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
        )
        env.pop("PYTHONPATH", None)
        built = subprocess.run([SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        env["PIP_NO_INDEX"] = "1"  # the printed pip install needs nothing from the network
        self.assertEqual(built.returncode, 0, built.stdout + built.stderr)
        steps = printed_steps(built.stdout)
        self.assertGreaterEqual(len(steps), 7, built.stdout)
        for step in steps:
            self.assertNotIn("etc/limiquantix/node.yaml /etc/", step)  # every host path is under root
            ran = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", step], cwd=tmp, env=env, capture_output=True, text=True
            )
            self.assertEqual(ran.returncode, 0, f"{step}\n{ran.stdout}{ran.stderr}")
            if step.startswith("python3 -m venv"):
                seed_dependencies(step.split()[-1])
        with open(os.path.join(root, "etc", "limiquantix", "node.yaml")) as fh:
            self.assertIn("listen_address", fh.read())
        unit = os.path.join(root, "etc", "systemd", "system", "quantix-node.service")
        self.assertTrue(os.path.isfile(unit))
        with open(log) as fh:
            recorded = fh.read()
        self.assertIn("systemctl enable --now quantix-node", recorded)
        self.assertIn("apt-get install", recorded)
        # Run again (an upgrade): the operator's node.yaml is kept.
        with open(os.path.join(root, "etc", "limiquantix", "node.yaml"), "w") as fh:
            fh.write("# mine\n")
        config_step = next(s for s in steps if "node.yaml" in s)
        subprocess.run(["bash", "-c", config_step], check=True, env=env)
        with open(os.path.join(root, "etc", "limiquantix", "node.yaml")) as fh:
            self.assertEqual(fh.read(), "# mine\n")
