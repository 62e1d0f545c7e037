"""What a pip install carries and finds: the shipped suites (from any directory, listed with
their descriptions), and a wheel whose suites are exactly the repository's probes/*.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from typer.testing import CliRunner

from loopdiag.cli import app
from loopdiag.run.probe_suite import available_suites, find_suite, load_probe_suite

ROOT = Path(__file__).resolve().parents[1]
PROBES = sorted((ROOT / "probes").glob("*.toml"))
runner = CliRunner()


def test_suite_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_suite(None).read_bytes() == (ROOT / "probes" / "default.toml").read_bytes()
    for path in PROBES:
        assert find_suite(path.stem).read_bytes() == path.read_bytes()


def test_a_probes_folder_here_comes_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / "default.toml").write_text('name = "mine"\ndescription = "my own default"\n')
    (tmp_path / "probes" / "extra.toml").write_text('description = "one more"\n')
    assert find_suite("default") == Path("probes") / "default.toml"
    suites = available_suites()
    assert suites["default"][1] == "my own default" and suites["extra"][1] == "one more"
    assert {path.stem for path in PROBES} <= set(suites)


def test_run_list_shows_every_suite_with_its_description(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "--list"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    for path in PROBES:
        description = tomllib.loads(path.read_text())["description"]
        assert path.stem in output and " ".join(description.split()) in output


def test_every_shipped_suite_has_a_description():
    for path in PROBES:
        assert load_probe_suite(path).description, f"{path}: add a one-line `description`"


def test_the_wheel_carries_exactly_the_suites_in_probes(tmp_path):
    """The suites' one copy is probes/; setup.py copies it into the wheel as loopdiag/suites/.
    Built without build isolation (no network) from a copy of the source tree."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("loopdiag", "probes"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("loopdiag-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {Path(name).name: archive.read(name) for name in archive.namelist()
                   if name.startswith("loopdiag/suites/")}
        assert not [name for name in archive.namelist() if name.split("/")[0] in ("tests", "reports", "probes")]
    assert shipped == {path.name: path.read_bytes() for path in PROBES}
