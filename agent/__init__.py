"""The measurement agent core: plugin API, pipeline, config and CLI.

Plugin authors import what they need from here (`hookimpl`, `Plugin`, the model types) and from
`agent.testing`:

    from agent import hookimpl, Plugin, PluginConfig, PolledSource

    @hookimpl
    def agent_plugins():
        return [MyPlugin]
"""

#: The package's version. The plugin API has a version of its own: `API_VERSION` (see agent.api).
__version__ = "0.1.0"

import pluggy

from agent.hookspecs import PROJECT_NAME

#: Marks a plugin module's hook implementations (`agent_plugins`, `agent_pipeline_started`...).
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

# The re-exports come after `hookimpl` and `__version__`: agent.plugin imports agent.model and
# agent.units, which need nothing from this package's namespace, so no cycle can form.
from agent.api import API_VERSION  # noqa: E402
from agent.backoff import Backoff  # noqa: E402
from agent.decoding import MalformedData, decode_untrusted  # noqa: E402
from agent.errors import StartupError, describe_exception  # noqa: E402
from agent.events import Event, EventBus, EventKind  # noqa: E402
from agent.formatting import TimestampFormatter, attribute_text  # noqa: E402
from agent.inbox import AckCallback, Envelope, OutputInbox  # noqa: E402
from agent.model import (  # noqa: E402
    CONSUMER_KINDS,
    LOCAL_MACHINE,
    LOCAL_MACHINE_CONSUMER,
    RESOURCE_KINDS,
    AttributeValue,
    Batch,
    BatchIdentity,
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
    AutonomousSource,
    BatchBuilder,
    CommandLineFlag,
    Output,
    OutputConfig,
    OverflowPolicy,
    Plugin,
    PluginConfig,
    PolledSource,
    PolledSourceConfig,
    RunningPipeline,
    Service,
    SourceSink,
    StartContext,
    Transform,
)
from agent.ratelimit import DropCounter, RateLimitedLog  # noqa: E402
from agent.tasks import ChangeNotifier, Reconnector, supervise  # noqa: E402
from agent.units import Duration, NonNegativeDuration, PositiveDuration, Size  # noqa: E402

__all__ = [
    "API_VERSION",
    "CONSUMER_KINDS",
    "LOCAL_MACHINE",
    "LOCAL_MACHINE_CONSUMER",
    "RESOURCE_KINDS",
    "AckCallback",
    "AttributeValue",
    "AutonomousSource",
    "Backoff",
    "Batch",
    "BatchIdentity",
    "BatchBuilder",
    "ChangeNotifier",
    "CommandLineFlag",
    "Consumer",
    "DropCounter",
    "Duration",
    "Envelope",
    "Event",
    "EventBus",
    "EventKind",
    "MalformedData",
    "MetricConflictError",
    "MetricDef",
    "MetricRegistry",
    "NonNegativeDuration",
    "Output",
    "OutputConfig",
    "OutputInbox",
    "OverflowPolicy",
    "Plugin",
    "PluginConfig",
    "PolledSource",
    "PolledSourceConfig",
    "PositiveDuration",
    "RateLimitedLog",
    "Reconnector",
    "Resource",
    "RunningPipeline",
    "Series",
    "Service",
    "Size",
    "SourceSink",
    "StartContext",
    "StartupError",
    "TimestampFormatter",
    "Transform",
    "attribute_text",
    "decode_untrusted",
    "describe_exception",
    "supervise",
    "Value",
    "ValueType",
    "__version__",
    "hookimpl",
    "now_ns",
]
