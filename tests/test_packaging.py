"""The package: pyproject.toml's metadata, the `recycle` console script, the CLI's help, and the declared license."""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path
from pkgutil import resolve_name

import pytest

import recycle
from recycle.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirements(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [re.sub(r"\s+", "", line) for line in lines if line and not line.startswith("-r")]


def test_pyproject_dependencies_mirror_requirements_txt():
    project = PYPROJECT["project"]
    runtime = _requirements(ROOT / "requirements.txt")
    app = [r for r in runtime if r.startswith("gradio")]
    assert app and project["optional-dependencies"]["app"] == app
    assert project["dependencies"] == [r for r in runtime if r not in app]
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"


def test_the_wheel_holds_every_module_of_the_package(tmp_path):
    """A wheel built from pyproject.toml carries each module of `recycle/`, subpackages included."""
    import shutil
    import subprocess
    import zipfile

    import setuptools
    from packaging.requirements import Requirement

    (needed,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    if setuptools.__version__ not in needed.specifier:  # pip builds in isolation with the declared setuptools
        pytest.skip(f"this environment's setuptools {setuptools.__version__} is older than the build's {needed}")

    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(ROOT / "recycle", src / "recycle", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    packed = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("recycle/") and n.endswith(".py")}
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "recycle").rglob("*.py")}
    assert packed == modules and "recycle/cli/parser.py" in packed and "recycle/formats/load.py" in packed


def test_console_script_resolves_and_prints_the_version(monkeypatch, capsys):
    main = resolve_name(PYPROJECT["project"]["scripts"]["recycle"].replace(":", "."))
    monkeypatch.setattr(sys, "argv", [str(Path(sys.prefix) / "bin" / "recycle"), "--version"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"recycle {recycle.__version__}"


def test_every_command_has_a_description_and_every_option_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert parser.description, f"`{name}` has no description"
        for action in parser._actions:
            assert action.help, f"`{name} {'/'.join(action.option_strings) or action.dest}` has no help"


def test_license_file_matches_the_declared_license():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert "license: apache-2.0" in (ROOT / "README.md").read_text(encoding="utf-8").split("---")[1]


def test_the_readme_results_table_is_the_reproductions_own():
    """The results table in the README, and the results and targets tables in reproduce/README.md, are the ones
    reproduce/ wrote, row for row."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    repro_readme = (ROOT / "reproduce" / "README.md").read_text(encoding="utf-8")
    written = (ROOT / "reproduce" / "results" / "results.md").read_text(encoding="utf-8")
    tables = re.findall(r"(?:^\|.*\n)+", written, re.M)
    assert len(tables) == 2 and len(tables[0].splitlines()) >= 4
    assert tables[0] in readme
    for table in tables:
        assert table in repro_readme


def test_every_number_in_the_reproductions_readme_comes_from_a_results_file():
    """A decimal quoted in reproduce/README.md appears in the results, the diagnostics or the experiment notes."""
    text = (ROOT / "reproduce" / "README.md").read_text(encoding="utf-8")
    sources = [ROOT / "reproduce" / "results" / f for f in ("results.md", "diagnose.md")]
    sources += sorted((ROOT / "docs" / "experiments").rglob("*.md"))
    written = "\n".join(p.read_text(encoding="utf-8") for p in sources if p.is_file())
    known = set(re.findall(r"\d+\.\d+", written))
    quoted = set(re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", text))
    assert quoted and quoted <= known, sorted(quoted - known)


def test_the_public_api_resolves_from_the_package_and_the_readme_example_uses_it():
    import importlib

    for name in recycle.__all__:
        value = getattr(recycle, name)
        assert value is getattr(importlib.import_module(f"recycle.{recycle._PUBLIC[name]}"), name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        recycle.nope
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    imports = [line for line in block.splitlines() if line.startswith(("from ", "import "))]
    assert imports == ["from recycle import FewShotClassifier, load_backbone, load_image, load_lora"]
    assert set(imports[0].split(" import ")[1].split(", ")) <= set(recycle.__all__)
