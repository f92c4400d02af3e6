"""Maps the plugins/ folder to the `agent_plugins` package, with every sub-package of it.

pyproject.toml cannot express "find packages under a folder and install them under another name",
so this one function does it; everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

builtin_plugins = ["agent_plugins"] + [f"agent_plugins.{p}" for p in find_packages("plugins")]
setup(packages=find_packages(include=["agent", "agent.*"]) + builtin_plugins)
