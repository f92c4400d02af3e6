"""The measurement agent core: plugin API, pipeline, config and CLI.

Plugin authors import what they need from here (`hookimpl`, `Plugin`, the model types) and from
`agent.testing`.
"""

__version__ = "0.1.0"
