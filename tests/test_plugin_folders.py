"""The contract of a plugin folder, checked for every built-in plugin and every plugins-contrib package.

A plugin folder has `plugin.py` (implementing `agent_plugins`), `sample.toml` (the commented
`[plugins.NAME]` table, `enable` first, every key of the Config with its default and a comment),
`README.md` (the sample embedded verbatim in a ```toml block) and `tests/test_<folder>.py`. This test
finds the folders itself, so a new plugin is checked without being listed here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from agent import config as config_mod
from agent.api import CURRENT_API_RANGE, api_accepts
from agent.config import convert_section
from agent.manager import BUILTIN_PLUGIN_MODULES, PluginEntry
from agent.plugin import Plugin

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PluginFolder:
    folder: Path  # the folder holding plugin.py
    module: str  # the importable module name
    tests: Path  # where its tests live

    def __str__(self) -> str:
        return str(self.folder.relative_to(ROOT))


def builtin_folders() -> list[PluginFolder]:
    """plugins/NAME/plugin.py, and plugins/FAMILY/NAME/plugin.py for the plugins of a family."""
    found = []
    for path in sorted((ROOT / "plugins").glob("*/plugin.py")) + sorted((ROOT / "plugins").glob("*/*/plugin.py")):
        package = ".".join(path.parent.relative_to(ROOT / "plugins").parts)
        found.append(PluginFolder(path.parent, f"agent_plugins.{package}.plugin", path.parent / "tests"))
    return found


def contrib_folders() -> list[PluginFolder]:
    found = []
    for pyproject in sorted((ROOT / "plugins-contrib").glob("*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        for module in project.get("entry-points", {}).get("agent.plugins", {}).values():
            package = module.rsplit(".", 1)[0]
            found.append(PluginFolder(pyproject.parent / package, module, pyproject.parent / "tests"))
    return found


FOLDERS = builtin_folders() + contrib_folders()


def import_plugin_module(folder: PluginFolder):
    if importlib.util.find_spec(folder.module.split(".")[0]) is None:
        message = (
            f"{folder.module} is not installed (pip install -e {folder.folder.parent.relative_to(ROOT)})"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must install it")
        pytest.skip(message)
    return importlib.import_module(folder.module)


def plugin_classes(folder: PluginFolder) -> list[type[Plugin]]:
    module = import_plugin_module(folder)
    hook = getattr(module, "agent_plugins", None)
    assert hook is not None, f"{folder}/plugin.py does not implement agent_plugins"
    assert hasattr(hook, "agent_impl"), (
        f"{folder}/plugin.py: agent_plugins is not marked with @agent.hookimpl"
    )
    classes = hook()
    assert classes and all(isinstance(c, type) and issubclass(c, Plugin) for c in classes)
    return classes


def test_the_plugin_folders_are_found() -> None:
    names = {f.folder.name for f in FOLDERS}
    assert {"system", "csv", "sqlite", "console", "synthetic", "discard", "agent_rapl"} <= names


@pytest.mark.parametrize("folder", builtin_folders(), ids=str)
def test_builtin_folder_is_registered(folder: PluginFolder) -> None:
    assert folder.module in BUILTIN_PLUGIN_MODULES, (
        f"{folder}: add {folder.module!r} to BUILTIN_PLUGIN_MODULES"
    )


@pytest.mark.parametrize("folder", FOLDERS, ids=str)
def test_folder_has_its_files(folder: PluginFolder) -> None:
    for name in ("__init__.py", "plugin.py", "sample.toml", "README.md"):
        assert (folder.folder / name).is_file(), f"{folder} has no {name}"
    test_name = folder.folder.name.removeprefix("agent_")
    assert (folder.tests / f"test_{test_name}.py").is_file(), f"{folder}: no tests/test_{test_name}.py"


@pytest.mark.parametrize("folder", FOLDERS, ids=str)
def test_sample_is_the_commented_default_table(folder: PluginFolder) -> None:
    [cls] = plugin_classes(folder)
    text = (folder.folder / "sample.toml").read_text()
    document = tomllib.loads(text)
    assert list(document) == ["plugins"] and list(document["plugins"]) == [cls.name], (
        f"{folder}/sample.toml must hold exactly the table [plugins.{cls.name}]"
    )
    table = document["plugins"][cls.name]
    assert list(table)[0] == "enable", f"{folder}/sample.toml: `enable` must be the first key"
    assert table["enable"] is cls.enabled_by_default, (
        f"{folder}/sample.toml: enable must match enabled_by_default"
    )

    # It converts, and it says exactly the defaults: the sample is the documentation of every key.
    config = convert_section(table, cls.Config, f"plugins.{cls.name}")
    defaults = msgspec.structs.replace(cls.Config(), enable=cls.enabled_by_default)
    assert config == defaults, f"{folder}/sample.toml differs from {cls.Config.__name__}'s defaults"
    assert set(table) == set(cls.Config.__struct_fields__), f"{folder}/sample.toml does not list every key"

    # Every key but `enable` has a comment line right above it.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        key = re.match(r"^([A-Za-z0-9_-]+)\s*=", line)
        if key and key.group(1) != "enable":
            assert lines[i - 1].startswith("#"), f"{folder}/sample.toml: no comment above `{key.group(1)}`"

    # The plugin finds its sample as package data (what `agent config regen` uses).
    assert cls.sample_config() == text


@pytest.mark.parametrize("folder", FOLDERS, ids=str)
def test_readme_embeds_the_sample_verbatim(folder: PluginFolder) -> None:
    sample = (folder.folder / "sample.toml").read_text()
    readme = (folder.folder / "README.md").read_text()
    assert f"```toml\n{sample}```" in readme, f"{folder}/README.md does not show sample.toml verbatim"


@pytest.mark.parametrize("folder", FOLDERS, ids=str)
def test_plugin_class_describes_itself(folder: PluginFolder) -> None:
    for cls in plugin_classes(folder):
        assert re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name), (
            f"{cls.name!r}: lower case words joined by -"
        )
        assert cls.description and cls.version
        assert cls.agent_api and api_accepts(cls.agent_api), (
            f"{cls.name}: declare the API range it was written for (agent_api = {CURRENT_API_RANGE!r})"
        )
        assert cls.provides and set(cls.provides) <= {"source", "transform", "output", "service"}
        assert issubclass(cls.Config, msgspec.Struct)


def test_generated_config_keeps_every_sample_line() -> None:
    entries = {}
    for folder in builtin_folders():
        for cls in plugin_classes(folder):
            entries[cls.name] = PluginEntry(cls, "built-in")
    generated = config_mod.generate(entries)
    for folder in builtin_folders():
        for line in (folder.folder / "sample.toml").read_text().splitlines():
            if not line.startswith("enable"):
                assert line in generated.splitlines(), (
                    f"{folder}/sample.toml: {line!r} is lost in a generated config"
                )
