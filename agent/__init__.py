"""The measurement agent core: plugin API, pipeline, config and CLI.

Plugin authors import what they need from here (`hookimpl`, `Plugin`, the model types) and from
`agent.testing`:

    from agent import hookimpl, Plugin, PluginConfig, PolledSource

    @hookimpl
    def agent_plugins():
        return [MyPlugin]
"""

__version__ = "0.1.0"

import pluggy

from agent.hookspecs import PROJECT_NAME

#: Marks a plugin module's hook implementations (`agent_plugins`, `agent_pipeline_started`...).
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

# The re-exports come after `hookimpl` and `__version__`: agent.plugin imports agent.model and
# agent.units, which need nothing from this package's namespace, so no cycle can form.
from agent.model import (  # noqa: E402
    CONSUMER_KINDS,
    LOCAL_MACHINE,
    LOCAL_MACHINE_CONSUMER,
    RESOURCE_KINDS,
    AttributeValue,
    Batch,
    Consumer,
    MetricConflictError,
    MetricDef,
    MetricRegistry,
    Resource,
    Series,
    Value,
    ValueType,
    now_ns,
)
from agent.plugin import (  # noqa: E402
    AckCallback,
    AutonomousSource,
    BatchBuilder,
    Output,
    OutputConfig,
    OverflowPolicy,
    Plugin,
    PluginConfig,
    PolledSource,
    SourceSink,
    StartContext,
    Transform,
)
from agent.units import Duration, Size  # noqa: E402

__all__ = [
    "CONSUMER_KINDS",
    "LOCAL_MACHINE",
    "LOCAL_MACHINE_CONSUMER",
    "RESOURCE_KINDS",
    "AckCallback",
    "AttributeValue",
    "AutonomousSource",
    "Batch",
    "BatchBuilder",
    "Consumer",
    "Duration",
    "MetricConflictError",
    "MetricDef",
    "MetricRegistry",
    "Output",
    "OutputConfig",
    "OverflowPolicy",
    "Plugin",
    "PluginConfig",
    "PolledSource",
    "Resource",
    "Series",
    "Size",
    "SourceSink",
    "StartContext",
    "Transform",
    "Value",
    "ValueType",
    "__version__",
    "hookimpl",
    "now_ns",
]
