"""Settings for the whole test suite (tests/, plugins/*/tests, plugins-contrib/*/tests)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI runs on a shared 2-core machine: a slow example is not a bug, so no per-example deadline.
settings.register_profile(
    "agent", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "agent"))
