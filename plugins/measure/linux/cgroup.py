"""Parsers for cgroup files and paths: pure functions, no I/O.

- `parse_mountinfo`: the cgroup hierarchies mounted (v1 with their controllers, v2), from
  /proc/self/mountinfo (proc(5): field 4 is the root of the mount inside its hierarchy, field 5 the
  mount point, after " - " the file system type and its super options, where v1 lists its controllers);
- `parse_flat_keyed`: `key value` lines (cpu.stat, memory.stat, cpuacct.stat);
- `parse_io_stat`: v2 io.stat, summed over devices;
- `parse_pressure`: PSI files ({cpu,memory,io}.pressure), the `total=` of `some` and `full` (µs);
- `cgroup_attributes`: what a path says about what runs in it (systemd unit, container, Kubernetes pod,
  Slurm job, OAR job), from the layouts these tools use.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class CgroupMount(NamedTuple):
    """A mounted hierarchy: `root` is the path of the mount inside the hierarchy ("/" usually, deeper
    in a container), `controllers` those of a v1 hierarchy (empty for v2)."""

    mount_point: str
    root: str
    version: int
    controllers: frozenset[str]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 1:
            continue
        fstype = tail[0]
        if fstype == "cgroup2":
            mounts.append(CgroupMount(_unescape(fields[4]), _unescape(fields[3]), 2, frozenset()))
        elif fstype == "cgroup":
            options = tail[2].split(",") if len(tail) > 2 else []
            controllers = frozenset(o for o in options if o not in ("rw", "ro") and "=" not in o)
            mounts.append(CgroupMount(_unescape(fields[4]), _unescape(fields[3]), 1, controllers))
    return mounts


def parse_flat_keyed(text: str) -> dict[str, int]:
    """`key value` per line; lines that are not are skipped (new kernels add keys mid-file)."""
    result = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                result[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return result


def parse_io_stat(text: str) -> tuple[int, int]:
    """v2 io.stat: `MAJ:MIN rbytes=N wbytes=N rios=N ...` per device; returns (read, written) bytes
    summed over devices."""
    read = written = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if key == "rbytes":
                read += int(value)
            elif key == "wbytes":
                written += int(value)
    return read, written


def parse_pressure(text: str) -> dict[str, int]:
    """PSI: `some avg10=0.00 avg60=0.00 avg300=0.00 total=N` (and `full ...`); returns the totals (µs)."""
    result = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] not in ("some", "full"):
            continue
        for item in parts[1:]:
            key, _, value = item.partition("=")
            if key == "total":
                result[parts[0]] = int(value)
    return result


def join_path(root: str, relative: str) -> str:
    """The path of a cgroup inside its hierarchy, from the mount's root and the path under the mount."""
    parts = [p for p in (root.strip("/"), relative.strip("/")) if p]
    return "/" + "/".join(parts)


_K8S_POD = re.compile(r"pod([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12})")
_CONTAINER_SCOPE = re.compile(r"^(docker|cri-containerd|crio|libpod)-([0-9a-f]{12,64})\.scope$")
_BARE_ID = re.compile(r"^[0-9a-f]{64}$")
_RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o", "libpod": "podman"}


def cgroup_attributes(path: str) -> dict[str, str]:
    """Attributes read from a cgroup's path. Known layouts:

    - systemd: `*.slice` parents and `*.service`/`*.scope` units (systemd.slice(5));
    - containers: `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope` under systemd,
      `/docker/<id>` with cgroupfs, a bare 64-hex id under a pod;
    - Kubernetes: `kubepods`, QoS tiers `burstable`/`besteffort` (Guaranteed pods sit directly under
      kubepods), `pod<uid>` (systemd driver: `kubepods-burstable-pod<uid_with_underscores>.slice`);
    - Slurm: `job_<id>`, `step_<id>`, `task_<id>`, `uid_<uid>` (v1 and v2 layouts);
    - OAR: `/oar/<user>_<jobid>` (OAR 2) and `oar-u<uid>-j<jobid>` (OAR 3).
    """
    attrs: dict[str, str] = {}
    parts = [p for p in path.split("/") if p]
    for index, part in enumerate(parts):
        if part.endswith(".slice"):
            attrs["systemd_slice"] = part
        elif part.endswith((".service", ".scope")) and not _CONTAINER_SCOPE.match(part):
            attrs["systemd_unit"] = part
        container = _CONTAINER_SCOPE.match(part)
        if container:
            attrs["container_runtime"] = _RUNTIMES[container.group(1)]
            attrs["container_id"] = container.group(2)
        elif index > 0 and parts[index - 1] == "docker" and re.fullmatch(r"[0-9a-f]{12,64}", part):
            attrs["container_runtime"] = "docker"
            attrs["container_id"] = part
        elif _BARE_ID.match(part) and any(p.startswith("pod") or "-pod" in p for p in parts[:index]):
            attrs["container_id"] = part
        pod = _K8S_POD.search(part)
        if pod and ("kubepods" in path):
            attrs["k8s_pod_uid"] = pod.group(1).replace("_", "-")
        if part.startswith("job_") and part[4:].isdigit():
            attrs["slurm_job_id"] = part[4:]
        elif part.startswith("step_") and "slurm_job_id" in attrs:
            attrs["slurm_step"] = part[5:]
        elif part.startswith("task_") and "slurm_job_id" in attrs:
            attrs["slurm_task"] = part[5:]
        elif part.startswith("uid_") and part[4:].isdigit() and "slurm" in path:
            attrs["user_id"] = part[4:]
        oar3 = re.fullmatch(r"oar-u(\d+)-j(\d+)(?:\.slice|\.scope)?", part)
        if oar3:
            attrs["oar_job_id"], attrs["user_id"] = oar3.group(2), oar3.group(1)
        elif index > 0 and parts[index - 1] == "oar":
            oar2 = re.fullmatch(r"(.+)_(\d+)", part)
            if oar2:
                attrs["oar_job_id"], attrs["user"] = oar2.group(2), oar2.group(1)
    if "kubepods" in path:
        if "k8s_pod_uid" in attrs:
            if "besteffort" in path:
                attrs["k8s_qos_class"] = "BestEffort"
            elif "burstable" in path:
                attrs["k8s_qos_class"] = "Burstable"
            else:
                attrs["k8s_qos_class"] = "Guaranteed"
    return attrs
