"""Every example in configs/ is a valid config for the installed plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config as config_mod
from agent.manager import build_plugin_manager, collect_plugins

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.fixture(scope="module")
def plugins():
    return collect_plugins(build_plugin_manager())


def test_there_are_examples() -> None:
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_is_valid(path: Path, plugins) -> None:
    cfg = config_mod.load(path, plugins, env={})
    assert cfg.plugins, f"{path.name} enables no plugin"
