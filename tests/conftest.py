"""Fixtures shared by the core's tests."""

from __future__ import annotations

from agent.testing import require_service

__all__ = ["require_service"]
