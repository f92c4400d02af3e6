"""The version of the plugin API, and the check of the API range that a plugin declares.

The plugin API is `agent` and its documented public modules (agent.plugin, agent.model, agent.units,
agent.testing, agent.net, agent.decoding, agent.durable_log, agent.inbox, agent.tasks, agent.ratelimit,
agent.errors, agent.backoff, agent.hookspecs, agent.formatting). Its version is separate from the
package's and follows semantic versioning:

- a major version removes or changes something a plugin may use (a name, a parameter, a hook, a
  behaviour a plugin relies on, such as when a hook is called);
- a minor version adds something (a name, a keyword parameter with a default, a hook); a name it
  replaces keeps working, with a warning, until the next minor version;
- a patch version changes nothing a plugin can see.

A plugin says which versions it was written for with the class attribute `agent_api`, a PEP 440
specifier such as ">=1,<2". The agent refuses to run a plugin whose range excludes `API_VERSION`.
"""

from __future__ import annotations

import functools
import logging
import warnings

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

#: The plugin API's version (semantic versioning), not the package's.
API_VERSION = "1.0.0"

#: The range that `agent plugins new` writes into a new plugin: this major version, from this minor on.
CURRENT_API_RANGE = (
    f">={Version(API_VERSION).major}.{Version(API_VERSION).minor},<{Version(API_VERSION).major + 1}"
)


log = logging.getLogger(__name__)


@functools.cache
def warn_deprecated(old: str, instead: str, removed_in: str) -> None:
    """Says once per process (a log warning, and a DeprecationWarning for test suites) that a plugin
    used `old`, which keeps working until API `removed_in`, and what to use `instead`."""
    message = f"{old} is deprecated and goes in agent API {removed_in}: use {instead}"
    log.warning("%s", message)
    warnings.warn(message, DeprecationWarning, stacklevel=3)


class InvalidApiRange(ValueError):
    """A plugin's `agent_api` is not a PEP 440 specifier."""


def api_accepts(api_range: str | None, version: str = API_VERSION) -> bool:
    """Whether a plugin declaring `api_range` may run on API `version` (None accepts every version).

    Raises `InvalidApiRange` when `api_range` is not a PEP 440 specifier such as ">=1,<2"."""
    if api_range is None:
        return True
    try:
        specifier = SpecifierSet(api_range)
    except InvalidSpecifier as exc:
        raise InvalidApiRange(f'agent_api {api_range!r} is not a version range such as ">=1,<2"') from exc
    if not str(specifier):
        raise InvalidApiRange(
            f'agent_api {api_range!r} is empty; write a range such as ">=1,<2" or leave it out'
        )
    return specifier.contains(version, prereleases=True)


__all__ = ["API_VERSION", "CURRENT_API_RANGE", "InvalidApiRange", "api_accepts", "warn_deprecated"]
