"""`agent plugins new`: writes a ready, pip-installable plugin package that uses only the public API.

    agent plugins new NAME --kind source|transform|output [--dir PATH]

creates PATH/agent-NAME/ with a `pyproject.toml` (the `agent.plugins` entry point, a dependency on the
agent), the package `agent_NAME/` (`plugin.py`, a working example of its kind; `sample.toml`; `README.md`
with the config table and the sample embedded verbatim) and `tests/` that use `agent.testing`. The
package follows the plugin folder contract that tests/test_plugin_folders.py checks for the built-ins.

The templates are plain text with `{{key}}` placeholders; `render` fills them in. The folder is written
under a temporary name and renamed at the end, so an error leaves nothing half-written and nothing that
exists is ever overwritten.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Container
from pathlib import Path

from agent import __version__
from agent.api import CURRENT_API_RANGE

KINDS = ("source", "transform", "output")

#: What `Plugin.name` may be: lower case words joined by "-" (as tests/test_plugin_folders.py checks).
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")


class ScaffoldError(Exception):
    """The plugin cannot be created; the message is one line saying why."""


def render(template: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", replace, template)


def template_values(name: str, kind: str) -> dict[str, str]:
    words = name.split("-")
    return {
        "name": name,
        "kind": kind,
        "package": "agent_" + "_".join(words),
        "module": "_".join(words),
        "Class": "".join(word.capitalize() for word in words),
        "name_re": name,  # letters, digits and "-": nothing to escape in a pattern
        "api": CURRENT_API_RANGE,
        "agent_version": __version__,
    }


def new_plugin(name: str, kind: str, parent: Path, taken: Container[str] = ()) -> Path:
    """Writes `parent/agent-NAME/` for a plugin of `kind` and returns its path.

    Raises ScaffoldError when the name is not a valid plugin name, is `taken` (an installed plugin's
    name), would make a package that already exists, or when the folder exists."""
    if not NAME_PATTERN.fullmatch(name):
        raise ScaffoldError(
            f"{name!r} is not a valid plugin name: lower case letters and digits, words joined by '-',"
            " starting with a letter (such as 'disk-temperature')"
        )
    if kind not in KINDS:
        raise ScaffoldError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if name in taken:
        raise ScaffoldError(f"a plugin named {name!r} is already installed; choose another name")
    values = template_values(name, kind)
    if importlib.util.find_spec(values["package"]) is not None:
        raise ScaffoldError(f"a package named {values['package']} is already installed; choose another name")
    target = parent / f"agent-{name}"
    if target.exists() or target.is_symlink():
        raise ScaffoldError(f"{target} already exists; nothing was written")
    if not parent.is_dir():
        raise ScaffoldError(f"--dir: {parent} is not a folder")

    files = {
        "pyproject.toml": PYPROJECT,
        f"{values['package']}/__init__.py": PACKAGE_INIT,
        f"{values['package']}/plugin.py": PLUGIN[kind],
        f"{values['package']}/sample.toml": SAMPLE[kind],
        f"{values['package']}/README.md": README[kind],
        f"tests/test_{values['module']}.py": TESTS[kind],
    }
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".agent-{name}.", dir=parent))
    except OSError as exc:
        raise ScaffoldError(f"--dir: cannot write in {parent}: {exc.strerror or exc}") from None
    try:
        # The README embeds the sample verbatim: rendered from the same text, they cannot differ.
        values["sample"] = render(SAMPLE[kind], values)
        for relative, template in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(template, values), encoding="utf-8")
        staging.chmod(0o777 & ~_umask())
        if target.exists():  # created meanwhile: still never overwritten
            raise ScaffoldError(f"{target} already exists; nothing was written")
        os.rename(staging, target)
    except OSError as exc:
        raise ScaffoldError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the files every kind shares --

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "agent-{{name}}"
version = "0.1.0"
description = "The {{name}} {{kind}} plugin for the measurement agent."
readme = "{{package}}/README.md"
requires-python = ">=3.11"
# The agent that this plugin was generated with, or a later one. The plugin API versions it works
# with are its `agent_api` range in {{package}}/plugin.py, which the agent checks when it loads it.
dependencies = ["measurement-agent>={{agent_version}}"]

[project.optional-dependencies]
test = ["pytest>=8.3", "pytest-trio>=0.8"]

# How the agent finds the plugin: the module that implements the `agent_plugins` hook.
[project.entry-points."agent.plugins"]
{{name}} = "{{package}}.plugin"

[tool.setuptools]
packages = ["{{package}}"]

[tool.setuptools.package-data]
{{package}} = ["*.toml", "*.md"]

[tool.pytest.ini_options]
trio_mode = true
testpaths = ["tests"]
"""

PACKAGE_INIT = '''\
"""The {{name}} plugin for the measurement agent (see README.md)."""
'''

# -- source: the load average, read with os.getloadavg() --

SOURCE_PLUGIN = '''\
"""The `{{name}}` source: the system's load average over 1, 5 and 15 minutes (os.getloadavg()).

Made by `agent plugins new` as a working example: replace what `poll` measures, keep the shape.
The agent polls the source every `poll_interval` and sends its points on every `flush_interval`.
"""

from __future__ import annotations

import os

from agent import (
    LOCAL_MACHINE,
    LOCAL_MACHINE_CONSUMER,
    BatchBuilder,
    Plugin,
    PolledSource,
    PolledSourceConfig,
    StartContext,
    hookimpl,
)


class {{Class}}Config(PolledSourceConfig, kw_only=True):
    """The `[plugins.{{name}}]` table; `poll_interval` and `flush_interval` come from PolledSourceConfig."""

    metric: str = "{{module}}_load_average"

    def __post_init__(self) -> None:
        super().__post_init__()
        # The loader shows this as `plugins.{{name}}.metric: ...`.
        if not self.metric:
            raise ValueError("metric: must not be empty")


class {{Class}}Source(PolledSource):
    """Measures the load average once per poll, one point per period."""

    def __init__(self, config: {{Class}}Config) -> None:
        self.poll_interval = float(config.poll_interval)
        self.flush_interval = float(config.flush_interval)
        self.metric = config.metric

    async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
        for period, value in zip(("1m", "5m", "15m"), os.getloadavg(), strict=True):
            attributes = {"period": period}
            points.add(self.metric, value, timestamp_ns, LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, attributes)


class {{Class}}Plugin(Plugin):
    name = "{{name}}"
    version = "0.1.0"
    # The plugin API versions this plugin was written for (agent.API_VERSION); the agent refuses
    # to run it on another.
    agent_api = "{{api}}"
    description = "The load average over 1, 5 and 15 minutes."
    Config = {{Class}}Config
    provides = ("source",)

    def start(self, ctx: StartContext, config: {{Class}}Config) -> None:
        ctx.create_metric(config.metric, unit="1", description="runnable tasks, averaged over `period`")
        ctx.add_source({{Class}}Source(config))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [{{Class}}Plugin]
'''

SOURCE_SAMPLE = """\
# {{name}}: the load average over 1, 5 and 15 minutes (one point per period, attribute `period`).
[plugins.{{name}}]
enable = false
# How often the load average is read.
poll_interval = "1s"
# How often the points are sent to the outputs (rounded to a whole number of polls).
flush_interval = "1s"
# The metric's name.
metric = "{{module}}_load_average"
"""

SOURCE_README = """\
# {{name}} source

The system's load average over 1, 5 and 15 minutes, read with `os.getloadavg()`: one point per period
on every poll, with the attribute `period` (`1m`, `5m`, `15m`). Made by `agent plugins new` as a
starting point: change what `{{Class}}Source.poll` measures in `plugin.py`.

```sh
pip install -e agent-{{name}}        # the agent finds it through its `agent.plugins` entry point
agent plugins list                   # {{name}}  0.1.0  source  no  {{api}}  agent-{{name}} 0.1.0
agent --plugins {{name}},csv --once  # one poll, written to agent-output.csv
pytest agent-{{name}}                # its tests
```

## Configuration

| key | default | meaning |
|---|---|---|
| `poll_interval` | `"1s"` | how often the load average is read |
| `flush_interval` | `"1s"` | how often the points go to the outputs (a whole number of polls) |
| `metric` | `"{{module}}_load_average"` | the metric's name |

```toml
{{sample}}```

## Metrics

| metric | unit | resource | consumer | attributes |
|---|---|---|---|---|
| `{{module}}_load_average` | `1` | `local_machine` | `local_machine` | `period`: `1m`, `5m`, `15m` |
"""

SOURCE_TESTS = '''\
"""Tests of the {{name}} source with agent.testing: from its config table, one poll, a running pipeline,
and a config error."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from agent.testing import (
    CollectingOutput,
    ConfigError,
    poll_once,
    running_pipeline,
    source_element,
    start_plugin,
)

from {{package}}.plugin import {{Class}}Plugin


def test_it_starts_from_its_config_table(tmp_path: Path) -> None:
    ctx = start_plugin({{Class}}Plugin, {"poll_interval": "2s", "flush_interval": "10s"}, data_dir=tmp_path)
    [element] = ctx.elements
    assert element.kind == "source" and element.plugin == "{{name}}"
    assert (element.obj.poll_interval, element.obj.flush_interval) == (2.0, 10.0)
    assert ctx.registry.get("{{module}}_load_average").unit == "1"


def test_a_bad_value_is_a_config_error_naming_its_key() -> None:
    with pytest.raises(ConfigError, match=r'^plugins\\.{{name_re}}\\.poll_interval: expected a duration like "30s"'):
        start_plugin({{Class}}Plugin, {"poll_interval": "often"})
    with pytest.raises(ConfigError, match=r"^plugins\\.{{name_re}}\\.metricc: unknown key"):
        start_plugin({{Class}}Plugin, {"metricc": "load"})
    with pytest.raises(ConfigError, match=r"^plugins\\.{{name_re}}\\.metric: must not be empty"):
        start_plugin({{Class}}Plugin, {"metric": ""})


async def test_one_poll_measures_the_three_periods() -> None:
    source = start_plugin({{Class}}Plugin).elements[0].obj
    batch = await poll_once(source, timestamp_ns=42)
    assert sorted(s.attributes["period"] for s in batch.series) == ["15m", "1m", "5m"]
    for series in batch.series:
        assert series.metric == "{{module}}_load_average" and series.timestamps == [42]
        assert series.values[0] >= 0


async def test_it_polls_in_a_running_pipeline(autojump_clock) -> None:
    source = start_plugin({{Class}}Plugin, {"poll_interval": "10s", "flush_interval": "10s"}).elements[0].obj
    out = CollectingOutput()
    async with running_pipeline([source_element(source, "{{name}}")], [out]):
        with trio.fail_after(60):
            await out.wait_for_points(6)  # two polls of three points: the first at once, then 10 s later
    assert len(out.values("{{module}}_load_average")) >= 6
'''

# -- transform: renames metrics --

TRANSFORM_PLUGIN = '''\
"""The `{{name}}` transform: renames metrics (a table of old -> new names, then an optional prefix).

Made by `agent plugins new` as a working example: replace what `apply` does, keep the shape. The
pipeline calls `apply` on every batch, in the order of the config's [plugins.*] tables.
"""

from __future__ import annotations

import msgspec

from agent import Batch, Plugin, PluginConfig, StartContext, Transform, hookimpl


class {{Class}}Config(PluginConfig, kw_only=True):
    """The `[plugins.{{name}}]` table."""

    rename: dict[str, str] = msgspec.field(default_factory=dict)
    prefix: str = ""

    def __post_init__(self) -> None:
        # The loader shows this as `plugins.{{name}}.rename: ...`.
        for old, new in self.rename.items():
            if not new:
                raise ValueError(f"rename: {old!r} is renamed to an empty name")


class {{Class}}Transform(Transform):
    """Renames every point's metric: `rename` first, then `prefix` in front."""

    def __init__(self, config: {{Class}}Config) -> None:
        self.rename = dict(config.rename)
        self.prefix = config.prefix

    def new_name(self, name: str) -> str:
        return self.prefix + self.rename.get(name, name)

    def apply(self, batch: Batch) -> Batch | None:
        for series in batch.series:
            if isinstance(series.metric, str):
                series.metric = self.new_name(series.metric)
            else:  # one name per point (Graphite paths)
                series.metric = [self.new_name(name) for name in series.metric]
        return batch


class {{Class}}Plugin(Plugin):
    name = "{{name}}"
    version = "0.1.0"
    # The plugin API versions this plugin was written for (agent.API_VERSION); the agent refuses
    # to run it on another.
    agent_api = "{{api}}"
    description = "Renames metrics: a table of old to new names, then a prefix."
    Config = {{Class}}Config
    provides = ("transform",)

    def start(self, ctx: StartContext, config: {{Class}}Config) -> None:
        ctx.add_transform({{Class}}Transform(config))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [{{Class}}Plugin]
'''

TRANSFORM_SAMPLE = """\
# {{name}}: renames metrics, first from the `rename` table, then with `prefix` in front.
[plugins.{{name}}]
enable = false
# Old name -> new name, such as { cpu_usage_percent = "cpu_percent" }.
rename = {}
# Put in front of every metric name (after `rename`), such as "site1_".
prefix = ""
"""

TRANSFORM_README = """\
# {{name}} transform

Renames metrics: a name found in `rename` takes its new name, then `prefix` goes in front of every
name. Made by `agent plugins new` as a starting point: change what `{{Class}}Transform.apply` does in
`plugin.py`.

```sh
pip install -e agent-{{name}}               # the agent finds it through its `agent.plugins` entry point
agent plugins list                          # {{name}}  0.1.0  transform  no  {{api}}  agent-{{name}} 0.1.0
agent --plugins system,{{name}},csv --once  # with [plugins.{{name}}] prefix = "x_" in agent.toml
pytest agent-{{name}}                       # its tests
```

## Configuration

| key | default | meaning |
|---|---|---|
| `rename` | `{}` | old name -> new name |
| `prefix` | `""` | put in front of every metric name, after `rename` |

```toml
{{sample}}```
"""

TRANSFORM_TESTS = '''\
"""Tests of the {{name}} transform with agent.testing: from its config table, one batch, a running
pipeline, and a config error."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.testing import (
    CollectingOutput,
    ConfigError,
    make_batch,
    make_series,
    run_transform,
    running_pipeline,
    start_plugin,
)

from {{package}}.plugin import {{Class}}Plugin


def transform_from(table: dict) -> object:
    return start_plugin({{Class}}Plugin, table).elements[0].obj


def test_it_starts_from_its_config_table(tmp_path: Path) -> None:
    ctx = start_plugin({{Class}}Plugin, {"rename": {"a": "b"}, "prefix": "x_"}, data_dir=tmp_path)
    [element] = ctx.elements
    assert element.kind == "transform" and element.plugin == "{{name}}"


def test_a_bad_value_is_a_config_error_naming_its_key() -> None:
    with pytest.raises(ConfigError, match=r"^plugins\\.{{name_re}}\\.prefixx: unknown key"):
        start_plugin({{Class}}Plugin, {"prefixx": "x_"})
    with pytest.raises(ConfigError, match=r"^plugins\\.{{name_re}}\\.rename: 'a' is renamed to an empty name"):
        start_plugin({{Class}}Plugin, {"rename": {"a": ""}})


def test_it_renames_then_prefixes() -> None:
    transform = transform_from({"rename": {"cpu_usage_percent": "cpu"}, "prefix": "site1_"})
    batch = make_batch(make_series("cpu_usage_percent", [1.0]), make_series("memory_used_bytes", [2.0]))
    result = run_transform(transform, batch)
    assert result is not None
    assert [s.metric for s in result.series] == ["site1_cpu", "site1_memory_used_bytes"]


async def test_it_renames_in_a_running_pipeline() -> None:
    ctx = start_plugin({{Class}}Plugin, {"rename": {"temperature_f": "temperature"}})
    out = CollectingOutput()
    async with running_pipeline(ctx.elements, [out]) as pipeline:
        assert await pipeline.sink().send_and_wait(make_batch(make_series("temperature_f", [50.0])))
    assert out.values("temperature") == [50.0]
'''

# -- output: one line per point, appended to a file --

OUTPUT_PLUGIN = '''\
"""The `{{name}}` output: appends one line per point to a file, `METRIC VALUE TIMESTAMP_NS`.

Made by `agent plugins new` as a working example: replace what `write` does, keep the shape. The core
queues points for the output, gathers them for up to `flush_interval`, calls `write`, and retries with
backoff (keeping the batches, in order) when `write` raises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from agent import (
    Batch,
    NonNegativeDuration,
    Output,
    OutputConfig,
    Plugin,
    StartContext,
    hookimpl,
)


class {{Class}}Config(OutputConfig, kw_only=True):
    """The `[plugins.{{name}}]` table; `queue_max_points` and `overflow` come from OutputConfig."""

    path: str = "{{name}}-output.txt"
    flush_interval: NonNegativeDuration = NonNegativeDuration(1.0)

    def __post_init__(self) -> None:
        # The loader shows this as `plugins.{{name}}.path: ...`.
        if not self.path:
            raise ValueError("path: must not be empty")


class {{Class}}Output(Output):
    """Appends `METRIC VALUE TIMESTAMP_NS` lines; a write returns once the lines are handed to the OS."""

    def __init__(self, path: Path, flush_interval: float) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self._file: Any = None  # trio's async file, open between open() and close()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = await trio.open_file(self.path, "a", encoding="utf-8")

    async def write(self, batches: list[Batch]) -> None:
        assert self._file is not None, "write before open"
        lines = [
            f"{metric} {value} {timestamp}\\n" for batch in batches for metric, timestamp, value, _ in batch.points()
        ]
        await self._file.write("".join(lines))
        await self._file.flush()

    async def close(self) -> None:
        if self._file is not None:
            await self._file.aclose()
            self._file = None


class {{Class}}Plugin(Plugin):
    name = "{{name}}"
    version = "0.1.0"
    # The plugin API versions this plugin was written for (agent.API_VERSION); the agent refuses
    # to run it on another.
    agent_api = "{{api}}"
    description = "Appends one line per point to a file: METRIC VALUE TIMESTAMP_NS."
    Config = {{Class}}Config
    provides = ("output",)

    def start(self, ctx: StartContext, config: {{Class}}Config) -> None:
        # A relative path is relative to the config file's folder.
        ctx.add_output({{Class}}Output(ctx.resolve_path(config.path), float(config.flush_interval)), config)


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [{{Class}}Plugin]
'''

OUTPUT_SAMPLE = """\
# {{name}}: appends one line per point to a file, METRIC VALUE TIMESTAMP_NS.
[plugins.{{name}}]
enable = false
# How many points may wait for this output before `overflow` applies.
queue_max_points = 1000000
# When the queue is full: "drop_oldest" (counted) or "block" (holds back the sources).
overflow = "drop_oldest"
# The file, appended to; relative to the config file's folder.
path = "{{name}}-output.txt"
# How long points are gathered before a write.
flush_interval = "1s"
"""

OUTPUT_README = """\
# {{name}} output

Appends one line per point to a file: `METRIC VALUE TIMESTAMP_NS`. Made by `agent plugins new` as a
starting point: change what `{{Class}}Output.write` does in `plugin.py`.

```sh
pip install -e agent-{{name}}           # the agent finds it through its `agent.plugins` entry point
agent plugins list                      # {{name}}  0.1.0  output  no  {{api}}  agent-{{name}} 0.1.0
agent --plugins system,{{name}} --once  # one poll of the system source, written to {{name}}-output.txt
pytest agent-{{name}}                   # its tests
```

## Configuration

| key | default | meaning |
|---|---|---|
| `queue_max_points` | `1000000` | how many points may wait for this output before `overflow` applies |
| `overflow` | `"drop_oldest"` | when the queue is full: `"drop_oldest"` (counted) or `"block"` |
| `path` | `"{{name}}-output.txt"` | the file, appended to; relative to the config file's folder |
| `flush_interval` | `"1s"` | how long points are gathered before a write |

```toml
{{sample}}```
"""

OUTPUT_TESTS = '''\
"""Tests of the {{name}} output with agent.testing: from its config table, a run over some batches,
a running pipeline, and a config error."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.testing import ConfigError, make_batch, make_series, run_output, running_pipeline, start_plugin

from {{package}}.plugin import {{Class}}Plugin


def test_it_starts_from_its_config_table(tmp_path: Path) -> None:
    ctx = start_plugin({{Class}}Plugin, {"path": str(tmp_path / "out.txt"), "flush_interval": "0s"})
    [element] = ctx.elements
    assert element.kind == "output" and element.plugin == "{{name}}"
    assert element.obj.path == tmp_path / "out.txt" and element.obj.flush_interval == 0.0


def test_a_bad_value_is_a_config_error_naming_its_key() -> None:
    with pytest.raises(ConfigError, match=r'^plugins\\.{{name_re}}\\.flush_interval: expected a duration like "30s"'):
        start_plugin({{Class}}Plugin, {"flush_interval": "soon"})
    with pytest.raises(ConfigError, match=r"^plugins\\.{{name_re}}\\.path: must not be empty"):
        start_plugin({{Class}}Plugin, {"path": ""})


async def test_it_writes_one_line_per_point(tmp_path: Path) -> None:
    output = start_plugin({{Class}}Plugin, {"path": str(tmp_path / "out.txt")}).elements[0].obj
    batch = make_batch(make_series("temperature", [20.5, 21.0], timestamps=[1, 2]))
    counters = await run_output(output, [batch])
    assert counters["written"] == 2 and counters["dropped"] == 0
    assert (tmp_path / "out.txt").read_text().splitlines() == ["temperature 20.5 1", "temperature 21.0 2"]


async def test_it_writes_in_a_running_pipeline(tmp_path: Path) -> None:
    ctx = start_plugin({{Class}}Plugin, {"path": str(tmp_path / "out.txt"), "flush_interval": "0s"})
    async with running_pipeline(ctx.elements) as pipeline:
        # send_and_wait returns once the output wrote the batch.
        assert await pipeline.sink().send_and_wait(make_batch(make_series("m", [1.0], timestamps=[7])))
        assert (tmp_path / "out.txt").read_text() == "m 1.0 7\\n"
'''

PLUGIN = {"source": SOURCE_PLUGIN, "transform": TRANSFORM_PLUGIN, "output": OUTPUT_PLUGIN}
SAMPLE = {"source": SOURCE_SAMPLE, "transform": TRANSFORM_SAMPLE, "output": OUTPUT_SAMPLE}
README = {"source": SOURCE_README, "transform": TRANSFORM_README, "output": OUTPUT_README}
TESTS = {"source": SOURCE_TESTS, "transform": TRANSFORM_TESTS, "output": OUTPUT_TESTS}

__all__ = ["KINDS", "NAME_PATTERN", "ScaffoldError", "new_plugin"]
