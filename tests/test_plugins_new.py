"""`agent plugins new`: the package it writes follows the plugin folder contract, installs with
`pip install -e` into a fresh virtualenv beside the agent, passes its own tests, and runs in the agent;
names that are taken or invalid, and folders that exist, are one-line errors that write nothing.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import msgspec
import pytest

from agent.api import CURRENT_API_RANGE
from agent.config import convert_section
from agent.scaffold import KINDS, ScaffoldError, new_plugin

from .test_third_party_plugins import one_line_error


def cli(
    args: list[str], cwd: Path, python: str = sys.executable, timeout: float = 60
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("AGENT_CONFIG", "PYTHONPATH")}
    return subprocess.run(
        [python, "-m", "agent.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_plugins_new_writes_a_package_for_each_kind(tmp_path: Path) -> None:
    for kind in KINDS:
        result = cli(["plugins", "new", f"my-{kind}", "--kind", kind, "--dir", str(tmp_path)], tmp_path)
        assert result.returncode == 0, result.stderr
        root = tmp_path / f"agent-my-{kind}"
        assert f"wrote {root}" in result.stderr
        package = f"agent_my_{kind}"
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
            f"{package}/README.md",
            f"{package}/__init__.py",
            f"{package}/plugin.py",
            f"{package}/sample.toml",
            "pyproject.toml",
            f"tests/test_my_{kind}.py",
        ]
        project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        assert project["name"] == f"agent-my-{kind}"
        assert project["entry-points"]["agent.plugins"] == {f"my-{kind}": f"{package}.plugin"}
        assert any(dep.startswith("measurement-agent>=") for dep in project["dependencies"])
    assert not (tmp_path / "agent.toml").exists()  # writing a plugin writes no config


@pytest.mark.parametrize("kind", KINDS)
def test_the_package_follows_the_plugin_folder_contract(tmp_path: Path, kind: str) -> None:
    root = new_plugin(f"contract-{kind}", kind, tmp_path)
    package = f"agent_contract_{kind}"
    folder = root / package
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(f"{package}.plugin")
        [cls] = module.agent_plugins()
        assert cls.name == f"contract-{kind}" and cls.provides == (kind,)
        assert cls.agent_api == CURRENT_API_RANGE and cls.description
        sample = (folder / "sample.toml").read_text()
        assert cls.sample_config() == sample
        table = tomllib.loads(sample)["plugins"][cls.name]
        assert list(table)[0] == "enable" and set(table) == set(cls.Config.__struct_fields__)
        config = convert_section(table, cls.Config, f"plugins.{cls.name}")
        assert config == msgspec.structs.replace(cls.Config(), enable=False)
        readme = (folder / "README.md").read_text()
        assert f"```toml\n{sample}```" in readme
        for key in table:
            if key != "enable":
                assert f"| `{key}` |" in readme, f"the README's config table lacks {key}"
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("csv", "output", "plugins new: a plugin named 'csv' is already installed; choose another name"),
        (
            "Disk_Temp",
            "source",
            "plugins new: 'Disk_Temp' is not a valid plugin name: lower case letters and digits, words joined"
            " by '-', starting with a letter (such as 'disk-temperature')",
        ),
        (
            "plugins",
            "source",
            "plugins new: a package named agent_plugins is already installed; choose another name",
        ),
        ("sink", "sink", "plugins new: --kind: expected one of source, transform, output, got 'sink'"),
    ],
)
def test_a_bad_name_or_kind_is_a_one_line_error(tmp_path: Path, name: str, kind: str, message: str) -> None:
    result = cli(["plugins", "new", name, "--kind", kind, "--dir", str(tmp_path)], tmp_path)
    assert result.returncode == 2
    assert one_line_error(result) == message
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_never_overwritten(tmp_path: Path) -> None:
    existing = tmp_path / "agent-weather"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    result = cli(["plugins", "new", "weather", "--kind", "source", "--dir", str(tmp_path)], tmp_path)
    assert result.returncode == 2
    assert one_line_error(result) == f"plugins new: {existing} already exists; nothing was written"
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent-weather"]  # no leftover staging folder
    with pytest.raises(ScaffoldError, match="--dir: .* is not a folder"):
        new_plugin("weather", "source", tmp_path / "missing")


@pytest.mark.slow
def test_each_kind_installs_beside_the_agent_passes_its_tests_and_runs(tmp_path: Path) -> None:
    """A fresh virtualenv that sees this environment's packages (the agent, pytest) through a .pth file,
    as `--system-site-packages` would a system install; the plugins go in with `pip install -e`, built
    without network (the build backend is this environment's setuptools)."""
    for kind in KINDS:
        assert new_plugin(f"my-{kind}", kind, tmp_path).is_dir()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    venv_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    # addsitedir, not a bare path: it also runs this site's .pth files (the agent's editable install).
    here = sysconfig.get_paths()["purelib"]
    Path(venv_site, "agent_beside.pth").write_text(f"import site; site.addsitedir({here!r})\n")

    editable = [arg for kind in KINDS for arg in ("-e", str(tmp_path / f"agent-my-{kind}"))]
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-index", *editable],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr

    for kind in KINDS:
        tests = subprocess.run(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / f"agent-my-{kind}")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert tests.returncode == 0, tests.stdout + tests.stderr
        assert "4 passed" in tests.stdout

    work = tmp_path / "work"
    work.mkdir()
    listed = cli(["plugins", "list", "--format", "json"], work, python)
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)}
    for kind in KINDS:
        assert plugins[f"my-{kind}"]["kinds"] == [kind]
        assert plugins[f"my-{kind}"]["api"] == CURRENT_API_RANGE and plugins[f"my-{kind}"]["refused"] is None
        assert plugins[f"my-{kind}"]["origin"] == {
            "builtin": False,
            "distribution": f"agent-my-{kind}",
            "version": "0.1.0",
        }

    (work / "agent.toml").write_text(
        "[agent]\nself_metrics_interval = '0s'\n"
        "[plugins.my-source]\n[plugins.system]\n[plugins.my-transform]\nprefix = 'renamed_'\n"
        "[plugins.csv]\npath = 'out.csv'\n[plugins.my-output]\npath = 'lines.txt'\n"
    )
    ran = cli(["--plugins", "my-source,csv", "--once"], work, python)
    assert ran.returncode == 0, ran.stderr
    rows = (work / "out.csv").read_text().splitlines()[1:]
    assert sorted(row.split(";")[-1] for row in rows) == ["period=15m", "period=1m", "period=5m"]
    assert all(row.startswith("my_source_load_average;") for row in rows)

    ran = cli(["--plugins", "system,my-transform,my-output", "--once"], work, python)
    assert ran.returncode == 0, ran.stderr
    lines = (work / "lines.txt").read_text().splitlines()
    assert lines and all(line.startswith("renamed_") and len(line.split()) == 3 for line in lines)
