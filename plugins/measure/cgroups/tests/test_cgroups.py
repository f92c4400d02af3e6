"""The cgroups source: its parsers (hypothesis and real files), attributes from known layouts, and a real
cgroup created on this machine (root), with a CPU-burning process moved into it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from agent import LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, Batch, Consumer, Event, EventBus, Series
from agent.testing import poll_once, start_plugin
from agent_plugins.measure.cgroups.plugin import CgroupsPlugin, choose_layout
from agent_plugins.measure.energy_attribution.plugin import EnergyAttribution
from agent_plugins.measure.linux.cgroup import (
    cgroup_attributes,
    join_path,
    parse_flat_keyed,
    parse_io_stat,
    parse_mountinfo,
    parse_pressure,
)

POLL_INTERVAL = 0.5

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""


def test_hybrid_mountinfo() -> None:
    mounts = parse_mountinfo(HYBRID)
    assert [(m.mount_point, m.version) for m in mounts] == [
        ("/sys/fs/cgroup/cpu", 1), ("/sys/fs/cgroup/cpuacct", 1), ("/sys/fs/cgroup/memory", 1),
        ("/sys/fs/cgroup/systemd", 1), ("/sys/fs/cgroup/unified", 2),
    ]
    assert mounts[3].controllers == frozenset({"xattr"}) or "systemd" not in mounts[3].controllers
    layout = choose_layout(mounts)
    assert layout.v2.mount_point == "/sys/fs/cgroup/unified"
    assert layout.cpuacct.mount_point == "/sys/fs/cgroup/cpuacct" and layout.memory.controllers == {"memory"}


def test_v2_only_and_combined_v1_controllers() -> None:
    v2 = choose_layout(parse_mountinfo("30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"))
    assert v2.v2.mount_point == "/sys/fs/cgroup" and v2.cpuacct is None
    v1 = choose_layout(parse_mountinfo("32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"))
    assert v1.cpuacct.root == "/docker/abc" and v1.v2 is None
    assert join_path(v1.cpuacct.root, "x/y") == "/docker/abc/x/y" and join_path("/", "batch/job1") == "/batch/job1"


def test_the_mountinfo_of_this_machine() -> None:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    assert any(m.version in (1, 2) for m in mounts)


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.integers(0, 2**63), max_size=12))
def test_flat_keyed_round_trip(values: dict[str, int]) -> None:
    text = "".join(f"{k} {v}\n" for k, v in values.items()) + "bad line here\n"
    assert parse_flat_keyed(text) == values


@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)), max_size=5))
def test_io_stat_sums_devices(devices: list[tuple[int, int]]) -> None:
    text = "".join(f"8:{i} rbytes={r} wbytes={w} rios=1 wios=2 dbytes=0 dios=0\n" for i, (r, w) in enumerate(devices))
    assert parse_io_stat(text) == (sum(r for r, _ in devices), sum(w for _, w in devices))


def test_pressure() -> None:
    text = "some avg10=0.00 avg60=1.50 avg300=0.00 total=1234\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=56\n"
    assert parse_pressure(text) == {"some": 1234, "full": 56}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/system.slice/nginx.service", {"systemd_slice": "system.slice", "systemd_unit": "nginx.service"}),
        ("/system.slice/docker-" + "a" * 64 + ".scope",
         {"systemd_slice": "system.slice", "container_runtime": "docker", "container_id": "a" * 64}),
        ("/docker/" + "b" * 64, {"container_runtime": "docker", "container_id": "b" * 64}),
        ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234abcd_12ab_34cd_56ef_1234567890ab.slice"
         "/cri-containerd-" + "c" * 64 + ".scope",
         {"systemd_slice": "kubepods-burstable-pod1234abcd_12ab_34cd_56ef_1234567890ab.slice",
          "k8s_pod_uid": "1234abcd-12ab-34cd-56ef-1234567890ab", "k8s_qos_class": "Burstable",
          "container_runtime": "containerd", "container_id": "c" * 64}),
        ("/kubepods/pod1234abcd-12ab-34cd-56ef-1234567890ab/" + "d" * 64,
         {"k8s_pod_uid": "1234abcd-12ab-34cd-56ef-1234567890ab", "k8s_qos_class": "Guaranteed", "container_id": "d" * 64}),
        ("/kubepods/besteffort/pod1234abcd-12ab-34cd-56ef-1234567890ab",
         {"k8s_pod_uid": "1234abcd-12ab-34cd-56ef-1234567890ab", "k8s_qos_class": "BestEffort"}),
        ("/system.slice/slurmstepd.scope/job_42/step_batch/user/task_0",
         {"systemd_slice": "system.slice", "systemd_unit": "slurmstepd.scope", "slurm_job_id": "42",
          "slurm_step": "batch", "slurm_task": "0"}),
        ("/slurm/uid_1000/job_7/step_0", {"user_id": "1000", "slurm_job_id": "7", "slurm_step": "0"}),
        ("/oar/alice_1234", {"oar_job_id": "1234", "user": "alice"}),
        ("/oar.slice/oar-u1000.slice/oar-u1000-j99.slice",
         {"systemd_slice": "oar-u1000-j99.slice", "oar_job_id": "99", "user_id": "1000"}),
        ("/batch/job1", {}),
    ],
)
def test_attributes_of_known_layouts(path: str, expected: dict[str, str]) -> None:
    assert cgroup_attributes(path) == expected


@given(st.lists(st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=20), max_size=6))
def test_attributes_never_fail(parts: list[str]) -> None:
    assert isinstance(cgroup_attributes("/" + "/".join(parts)), dict)


# -- a real cgroup on this machine --


def hierarchies() -> list[Path]:
    """Where to create the test cgroup: the v2 hierarchy and the v1 cpuacct one, whichever exist."""
    layout = choose_layout(parse_mountinfo(Path("/proc/self/mountinfo").read_text()))
    return [Path(m.mount_point) for m in (layout.v2, layout.cpuacct) if m is not None and m.root == "/"]


@pytest.fixture
def test_cgroup() -> Iterator[tuple[str, list[Path]]]:
    if os.geteuid() != 0:
        pytest.skip("creating a cgroup needs root")
    name = f"agent-test-{uuid.uuid4().hex[:8]}"
    made: list[Path] = []
    try:
        for root in hierarchies():
            (root / name).mkdir()
            made.append(root / name)
    except OSError as exc:
        for d in made:
            d.rmdir()
        pytest.skip(f"cannot create a cgroup here: {exc}")
    if not made:
        pytest.skip("no writable cgroup hierarchy")
    try:
        yield f"/{name}", made
    finally:
        for directory in made:
            if directory.exists():
                for pid in (directory / "cgroup.procs").read_text().split():
                    (directory.parent / "cgroup.procs").write_text(pid)
                directory.rmdir()


def cgroup_cpu(batch: Batch, path: str) -> float:
    return sum(v for s in batch.series if s.metric == "cpu_time_delta" and s.consumer == Consumer("cgroup", path)
               and s.attributes.get("kind") == "total" for v in s.values)


async def test_a_new_cgroup_is_announced_measured_and_ended(test_cgroup: tuple[str, list[Path]]) -> None:
    path, directories = test_cgroup
    events = EventBus()
    seen: list[Event] = []
    events.subscribe(seen.append)
    ctx = start_plugin(CgroupsPlugin, {"include": [path], "poll_interval": "500ms"}, events=events)
    [source] = [e.obj for e in ctx.elements]
    # Our cgroup exists already at the first poll: announced, with zero deltas.
    first = await poll_once(source)
    assert [e.kind for e in seen] == ["consumer_started"] and seen[0].consumer == Consumer("cgroup", path)
    assert cgroup_cpu(first, path) == 0
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for directory in directories:
            (directory / "cgroup.procs").write_text(str(burner.pid))
        # Within two polls of the move, the cgroup's CPU time shows (one consumer, even in two hierarchies).
        cpu = 0.0
        polls = []
        for _ in range(2):
            await trio.sleep(POLL_INTERVAL)  # what the pipeline waits between two polls
            batch = await poll_once(source)
            polls.append(batch)
            cpu += cgroup_cpu(batch, path)
            if cpu > 0:
                break
        assert cpu > 0
        assert {s.consumer.id for b in polls for s in b.series} == {path}
    finally:
        burner.kill()
        burner.wait()
    for directory in directories:
        directory.rmdir()
    after = await poll_once(source)
    assert seen[-1].kind == "consumer_ended" and seen[-1].consumer == Consumer("cgroup", path)
    assert not any(s.consumer.id == path for s in after.series)


async def test_a_cgroup_created_later_is_counted_from_its_start(test_cgroup: tuple[str, list[Path]]) -> None:
    path, directories = test_cgroup
    ctx = start_plugin(CgroupsPlugin, {"include": [path + "/*"]})
    [source] = [e.obj for e in ctx.elements]
    await poll_once(source)
    burner = subprocess.Popen([sys.executable, "-c", "import time\nwhile time.process_time() < 0.2: pass"])
    children = []
    try:
        for directory in directories:
            (directory / "job1").mkdir()
            children.append(directory / "job1")
            (directory / "job1" / "cgroup.procs").write_text(str(burner.pid))
        burner.wait()
        batch = await poll_once(source)
        assert cgroup_cpu(batch, path + "/job1") > 0.05
        # Its energy: attributed among the children of its parent, never more than the machine's.
        t = EnergyAttribution(max_delay=10)
        t0 = batch.series[0].timestamps[0]
        t.apply(Batch([
            Series("estimated_energy", LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, [t0 - 10**9], [0.0]),
            Series("kernel_cpu_time", LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {"state": "user"}, [t0 - 10**9], [0.0]),
        ]))
        batch.series += [
            Series("estimated_energy", LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {}, [t0], [50.0]),
            Series("kernel_cpu_time", LOCAL_MACHINE, LOCAL_MACHINE_CONSUMER, {"state": "user"}, [t0], [1.0]),
        ]
        out = t.apply(batch)
        [energy] = [s for s in out.series if s.metric == "attributed_energy"]
        assert energy.consumer == Consumer("cgroup", path + "/job1") and 0 < energy.values[0] <= 50.0
    finally:
        if burner.poll() is None:
            burner.kill()
            burner.wait()
        for child in children:
            for pid in (child / "cgroup.procs").read_text().split():
                (child.parent.parent / "cgroup.procs").write_text(pid)
            child.rmdir()
