"""The documentation site's generated pages (docs/hooks.py): every plugin folder has its page, made from
its README.md and sample.toml, and the example plugin page is what `agent plugins new` writes.

`nox -s docs` (run by .ci/run) builds the whole site in strict mode; these tests check the generation
without building. mkdocs comes with the `docs` extra (in requirements.lock): without it they are
skipped, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

from .test_plugin_folders import FOLDERS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hooks():
    if importlib.util.find_spec("mkdocs") is None:
        message = "mkdocs is not installed (pip install -e '.[docs]')"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must install it")
        pytest.skip(message)
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_hooks"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["docs_hooks"]


def test_every_plugin_folder_has_its_page(hooks) -> None:
    documented = {p.folder: p for p in hooks.plugin_folders()}
    assert set(documented) == {f.folder for f in FOLDERS}
    by_folder = documented
    for plugin in documented.values():
        page = hooks.plugin_page(plugin, by_folder)
        sample = (plugin.folder / "sample.toml").read_text()
        assert f"```toml\n{sample}```" in page
        assert list(tomllib.loads(sample)["plugins"]) == [plugin.name]
        # Every relative link points at a page of the site: another plugin's page or a page under docs/.
        for target in re.findall(r"\]\(([^)\s#]+)[^)]*\)", page):
            if re.match(r"^[a-z]+:", target):
                continue
            resolved = (ROOT / "docs" / "plugins" / target).resolve()
            generated = {(ROOT / "docs" / p.page).resolve() for p in documented.values()}
            assert resolved in generated or resolved.is_file(), f"{plugin.page}: broken link {target}"


def test_the_example_page_is_what_plugins_new_writes(hooks, tmp_path: Path) -> None:
    from agent.scaffold import new_plugin

    root = new_plugin("loadavg", "source", tmp_path)
    page = hooks.example_page()
    for relative in ("pyproject.toml", "agent_loadavg/plugin.py", "agent_loadavg/sample.toml", "tests/test_loadavg.py"):
        assert (root / relative).read_text().rstrip("\n") in page, relative


def test_the_site_is_built_by_ci_in_strict_mode() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    assert "strict: true" in config and "hooks:\n  - docs/hooks.py" in config
    assert "nox -s docs" in (ROOT / ".ci" / "run").read_text()
    assert "site/" in (ROOT / ".gitignore").read_text().splitlines()
