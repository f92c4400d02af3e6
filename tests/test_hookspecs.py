"""Meta-tests of the plugin API's reference documentation: every hook in agent/hookspecs.py has a
docstring that says when it is called and what each parameter is, and every hook is exercised by a
test (tests/test_runtime.py's LifecycleRecorder implements them all and checks each call)."""

from __future__ import annotations

import inspect

import pytest

from agent import hookspecs
from agent.manager import build_plugin_manager, collect_command_line_flags, collect_plugins

from .test_runtime import LifecycleRecorder, make_agent

HOOKS = sorted(
    name for name, fn in vars(hookspecs).items() if inspect.isfunction(fn) and hasattr(fn, "agent_spec")
)


def test_there_are_hooks() -> None:
    assert {"agent_plugins", "agent_pipeline_started", "agent_pipeline_stopped"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented(name: str) -> None:
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    assert len(doc) > 60, f"{name}: document when it is called, its parameters and its result"
    assert "called" in doc.lower(), f"{name}: the docstring must say when the hook is called"
    for parameter in inspect.signature(fn).parameters:
        assert f"`{parameter}`" in doc, f"{name}: the docstring does not describe `{parameter}`"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_exercised_by_a_test(name: str) -> None:
    impl = getattr(LifecycleRecorder, name, None)
    assert impl is not None, f"{name}: add it to tests/test_runtime.py's LifecycleRecorder and check its call"
    spec_parameters = list(inspect.signature(getattr(hookspecs, name)).parameters)
    assert list(inspect.signature(impl).parameters)[1:] == spec_parameters


async def test_an_agent_run_calls_every_hook() -> None:
    recorder = LifecycleRecorder()
    pm = build_plugin_manager([recorder], load_entry_points=False)
    # The CLI collects the flags before it parses the command line; the agent run calls the rest.
    collect_command_line_flags(pm, collect_plugins(pm))
    await make_agent(["ticks", "collect"], pm).run(once=True, handle_signals=False)
    assert sorted(recorder.calls) == HOOKS
