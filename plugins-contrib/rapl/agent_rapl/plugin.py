"""The `rapl` source: energy and power of CPU packages and DRAM from the powercap sysfs tree.

Intel (and recent AMD) CPUs count the energy of each RAPL domain in a micro-joule counter that wraps
around at `max_energy_range_uj`. Linux exposes it as

    /sys/class/powercap/intel-rapl:N/            a package (name "package-N") or the platform ("psys")
        name, energy_uj, max_energy_range_uj
    /sys/class/powercap/intel-rapl:N:M/          a subdomain of package N ("dram", "core", "uncore")

At each poll the source reads every counter and emits, per domain, the energy consumed since the previous
poll (`rapl_consumed_energy`, J) and the mean power over that interval (`rapl_power`, W). The first poll
only records the counters. A counter lower than before has wrapped: the delta adds the range.

Resources follow Alumet's rapl plugin: `cpu_package` for package, core and uncore (attribute `domain`
says which), `dram` for DRAM, `local_machine` for psys; the id is the package number.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import msgspec

from agent import (
    LOCAL_MACHINE,
    LOCAL_MACHINE_CONSUMER,
    BatchBuilder,
    Duration,
    Plugin,
    PluginConfig,
    PolledSource,
    Resource,
    StartContext,
    hookimpl,
)

log = logging.getLogger(__name__)

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
KNOWN_DOMAINS = ("package", "dram", "core", "uncore", "psys")
_ZONE_DIR = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")
_PACKAGE_NAME = re.compile(r"^package-(\d+)$")


class RaplConfig(PluginConfig, kw_only=True):
    """The `[plugins.rapl]` table."""

    poll_interval: Duration = Duration(1.0)
    flush_interval: Duration = Duration(5.0)
    powercap_root: str = DEFAULT_POWERCAP_ROOT
    domains: list[str] = msgspec.field(default_factory=lambda: ["package", "dram"])

    def __post_init__(self) -> None:
        if self.poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {self.poll_interval!r}")
        if self.flush_interval < self.poll_interval:
            raise ValueError(
                f"flush_interval ({self.flush_interval!r}) must not be shorter than poll_interval ({self.poll_interval!r})"
            )
        unknown = sorted(set(self.domains) - set(KNOWN_DOMAINS))
        if unknown:
            raise ValueError(f"unknown domains {unknown} (known: {', '.join(KNOWN_DOMAINS)})")
        if not self.domains:
            raise ValueError("domains must name at least one domain")


@dataclass
class RaplDomain:
    """One RAPL zone: where its counter is, what it measures, and the last reading."""

    path: Path
    domain: str  # package, dram, core, uncore, psys
    resource: Resource
    max_energy_range_uj: int
    last_energy_uj: int | None = None
    last_timestamp_ns: int = 0

    @property
    def attributes(self) -> dict[str, str]:
        return {"domain": self.domain}


def read_counter(path: Path) -> int:
    return int(path.read_text().strip())


def energy_delta_uj(before: int, after: int, max_energy_range_uj: int) -> int:
    """The energy between two readings of a counter that wraps around at `max_energy_range_uj`."""
    if after >= before:
        return after - before
    return max_energy_range_uj - before + after


def discover_domains(root: Path, wanted: list[str]) -> tuple[list[RaplDomain], list[str]]:
    """The readable zones under `root` whose domain is in `wanted`, and why the others were left out.

    A zone is usable when its name, range and energy counter can all be read now; the reasons for the
    others go into the start error (or a warning when some zones work)."""
    domains: list[RaplDomain] = []
    problems: list[str] = []
    if not root.is_dir():
        return [], [f"{root} does not exist (no powercap support, or the intel_rapl module is not loaded)"]
    zones = sorted(
        (tuple(int(g) if g is not None else -1 for g in m.groups()), entry)
        for entry in root.iterdir()
        if (m := _ZONE_DIR.match(entry.name))
    )
    if not zones:
        return [], [f"{root} has no intel-rapl:N zone"]
    package_ids: dict[int, str] = {}
    for (zone, subzone), entry in zones:
        try:
            name = (entry / "name").read_text().strip()
        except OSError as exc:
            problems.append(f"{entry / 'name'}: {exc.strerror or exc}")
            continue
        package = _PACKAGE_NAME.match(name)
        if subzone < 0:
            package_ids[zone] = package.group(1) if package else str(zone)
        package_id = package_ids.get(zone, str(zone))
        if package:
            domain, resource = "package", Resource("cpu_package", package_id)
        elif name == "psys":
            domain, resource = "psys", LOCAL_MACHINE
        elif name == "dram":
            domain, resource = "dram", Resource("dram", package_id)
        elif name in ("core", "uncore"):
            domain, resource = name, Resource("cpu_package", package_id)
        else:
            log.debug("rapl: %s has the unknown domain name %r; skipped", entry, name)
            continue
        if domain not in wanted:
            continue
        try:
            max_range = read_counter(entry / "max_energy_range_uj")
            read_counter(entry / "energy_uj")
        except PermissionError:
            problems.append(f"{entry / 'energy_uj'}: permission denied")
            continue
        except (OSError, ValueError) as exc:
            problems.append(f"{entry.name} ({name}): {getattr(exc, 'strerror', None) or exc}")
            continue
        domains.append(RaplDomain(entry, domain, resource, max_range))
    return domains, problems


class RaplSource(PolledSource):
    def __init__(self, domains: list[RaplDomain], poll_interval: float, flush_interval: float) -> None:
        self.domains = domains
        self.poll_interval = float(poll_interval)
        self.flush_interval = float(flush_interval)
        self._failing: set[Path] = set()

    async def poll(self, points: BatchBuilder, timestamp_ns: int) -> None:
        # A handful of small sysfs reads: cheaper inline than a thread hop.
        for d in self.domains:
            try:
                energy = read_counter(d.path / "energy_uj")
            except (OSError, ValueError) as exc:
                if d.path not in self._failing:
                    self._failing.add(d.path)
                    log.warning("rapl: cannot read %s: %s", d.path / "energy_uj", exc)
                d.last_energy_uj = None  # the next good reading starts a new interval
                continue
            self._failing.discard(d.path)
            previous, previous_ts = d.last_energy_uj, d.last_timestamp_ns
            d.last_energy_uj, d.last_timestamp_ns = energy, timestamp_ns
            if previous is None or timestamp_ns <= previous_ts:
                continue
            joules = energy_delta_uj(previous, energy, d.max_energy_range_uj) / 1e6
            seconds = (timestamp_ns - previous_ts) / 1e9
            attrs = d.attributes
            points.add(
                "rapl_consumed_energy", joules, timestamp_ns, d.resource, LOCAL_MACHINE_CONSUMER, attrs
            )
            points.add(
                "rapl_power", joules / seconds, timestamp_ns, d.resource, LOCAL_MACHINE_CONSUMER, attrs
            )


class RaplPlugin(Plugin):
    name = "rapl"
    version = "0.1.0"
    agent_api = ">=1,<2"
    description = "CPU package and DRAM energy (J) and power (W) from RAPL counters in /sys/class/powercap."
    Config = RaplConfig
    enabled_by_default = False
    provides = ("source",)

    def start(self, ctx: StartContext, config: RaplConfig) -> None:
        root = Path(config.powercap_root)
        domains, problems = discover_domains(root, config.domains)
        if not domains:
            raise RuntimeError(
                f"no RAPL domain under {root}: {'; '.join(problems) or 'none of ' + ', '.join(config.domains)}"
                "; permissions? (energy_uj is readable by root only on recent kernels)"
            )
        for problem in problems:
            ctx.logger.warning("RAPL zone left out: %s", problem)
        ctx.logger.info(
            "measuring %s", ", ".join(f"{d.domain} {d.resource.kind}:{d.resource.id}" for d in domains)
        )
        ctx.create_metric(
            "rapl_consumed_energy", "J", "float", "energy consumed by the RAPL domain since the previous poll"
        )
        ctx.create_metric("rapl_power", "W", "float", "mean power of the RAPL domain since the previous poll")
        # Announced as resources on the event bus: a plugin that measures per resource (or a user's
        # listener) learns what this machine has without reading the powercap tree itself.
        for d in domains:
            ctx.events.resource_started(d.resource, domain=d.domain)
        ctx.add_source(RaplSource(domains, config.poll_interval, config.flush_interval))


@hookimpl
def agent_plugins() -> list[type[Plugin]]:
    return [RaplPlugin]
