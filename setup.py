"""The wheel carries the probe suites: `probes/*.toml` (one copy, where people read and edit
them) are copied into the built package as `loopdiag/suites/*.toml`, which
`loopdiag.run.probe_suite.suite_folders` finds with importlib.resources. Everything else is in
pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SUITES_SOURCE = Path("probes")
SUITES_PACKAGE_DIR = Path("loopdiag") / "suites"


class BuildPyWithSuites(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / SUITES_PACKAGE_DIR
        shutil.rmtree(target, ignore_errors=True)  # a suite removed from probes/ leaves no stale copy
        target.mkdir(parents=True)
        for suite in sorted(SUITES_SOURCE.glob("*.toml")):
            self.copy_file(str(suite), str(target / suite.name))


setup(cmdclass={"build_py": BuildPyWithSuites})
