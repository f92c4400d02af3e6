"""The procfs source: its /proc parsers (hypothesis), and the source on this machine's real /proc,
following a CPU-burning process announced on the event bus or matched by pattern."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from agent import Consumer, EventBus
from agent.testing import poll_once, start_plugin
from agent_plugins.measure.linux.proc import (
    busy_ticks,
    counter_delta,
    meminfo_metric_name,
    parse_kernel_stat,
    parse_key_values,
    parse_net_dev,
    parse_pid_stat,
    parse_statm,
)
from agent_plugins.measure.procfs.plugin import ProcfsPlugin, ProcfsSource

BURN = "import time\nend = time.time() + 30\nwhile time.time() < end: pass"

# -- parsers --

comms = st.text(st.characters(blacklist_characters="\0\n", blacklist_categories=("Cs",)), max_size=15)
ticks = st.integers(min_value=0, max_value=2**63 - 1)


@given(comm=comms, pid=st.integers(1, 2**22), utime=ticks, stime=ticks, start=ticks, guest=ticks)
def test_pid_stat_reads_the_fields_after_the_last_parenthesis(
    comm: str, pid: int, utime: int, stime: int, start: int, guest: int
) -> None:
    fields = ["S", "1", "1", "1", "0", "-1", "4194304", "0", "0", "0", "0", str(utime), str(stime), "0", "0",
              "20", "0", "1", "0", str(start), "1000", "25"] + ["0"] * 18 + [str(guest), "0"]
    stat = parse_pid_stat(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    assert (stat.pid, stat.comm, stat.utime, stat.stime, stat.starttime, stat.guest_time) == (
        pid, comm, utime, stime, start, guest,
    )
    assert (stat.vsize, stat.rss, stat.ppid) == (1000, 25, 1)


def test_pid_stat_of_this_process() -> None:
    with open(f"/proc/{os.getpid()}/stat") as f:
        stat = parse_pid_stat(f.read())
    assert stat.pid == os.getpid() and stat.ppid == os.getppid()


@pytest.mark.parametrize("text", ["", "12 no parenthesis", "12 (x) S 1 2"])
def test_pid_stat_rejects_truncated_text(text: str) -> None:
    with pytest.raises(ValueError):
        parse_pid_stat(text)


@given(st.lists(st.tuples(*[ticks] * 10), min_size=1, max_size=8), ticks, ticks, st.integers(0, 10**6))
def test_kernel_stat_round_trip(cpus: list[tuple[int, ...]], ctxt: int, forks: int, running: int) -> None:
    lines = ["cpu  " + " ".join(map(str, cpus[0]))]
    lines += [f"cpu{i} " + " ".join(map(str, c)) for i, c in enumerate(cpus[1:])]
    lines += ["intr 1 2 3", f"ctxt {ctxt}", "btime 1", f"processes {forks}", f"procs_running {running}",
              "procs_blocked 0", "softirq 1 2"]
    stat = parse_kernel_stat("\n".join(lines) + "\n")
    assert stat.cpus["cpu"] == cpus[0] and len(stat.cpus) == len(cpus)
    assert (stat.context_switches, stat.forks, stat.procs_running) == (ctxt, forks, running)
    user, nice, system, idle, iowait, irq, softirq, steal, _guest, _guest_nice = cpus[0]
    assert busy_ticks(cpus[0]) == user + nice + system + irq + softirq + steal


def test_kernel_stat_of_this_machine() -> None:
    with open("/proc/stat") as f:
        stat = parse_kernel_stat(f.read())
    assert len(stat.cpus) == os.cpu_count() + 1 and stat.procs_running >= 1


def test_key_values_turn_kb_into_bytes() -> None:
    values = parse_key_values("MemTotal:  100 kB\nHugePages_Total:   3\nrchar: 42\nbad line\n")
    assert values == {"MemTotal": 102400, "HugePages_Total": 3, "rchar": 42}


@pytest.mark.parametrize(
    ("key", "name"),
    [("MemTotal", "meminfo_mem_total"), ("Active(anon)", "meminfo_active_anon"),
     ("HugePages_Total", "meminfo_huge_pages_total"), ("DirectMap4k", "meminfo_direct_map4k")],
)
def test_meminfo_names(key: str, name: str) -> None:
    assert meminfo_metric_name(key) == name


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True), st.lists(ticks, min_size=16, max_size=16),
                       min_size=1, max_size=5))
def test_net_dev_round_trip(interfaces: dict[str, list[int]]) -> None:
    text = "Inter-|   Receive |  Transmit\n face |bytes    packets|bytes\n"
    text += "".join(f"{name:>6}: " + " ".join(map(str, numbers)) + "\n" for name, numbers in interfaces.items())
    parsed = parse_net_dev(text)
    for name, numbers in interfaces.items():
        assert parsed[name]["bytes"] == (numbers[0], numbers[8])
        assert parsed[name]["drop"] == (numbers[3], numbers[11])


@given(st.integers(0, 2**62), st.integers(0, 2**62))
def test_counter_delta_is_never_negative(before: int, after: int) -> None:
    delta = counter_delta(before, after)
    assert delta >= 0 and (delta == after - before or delta == after)


def test_statm() -> None:
    assert parse_statm("10 5 2 1 0 3 0\n") == (10, 5, 2)


# -- the source on the real /proc --


@pytest.fixture
def burner() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", BURN, "procfs-test-burner"])
    yield process
    process.kill()
    process.wait()


def process_cpu(batch, pid: int) -> float:
    return sum(
        v for s in batch.series if s.metric == "cpu_time_delta" and s.consumer == Consumer("process", str(pid))
        for v in s.values
    )


async def poll_until_cpu(source: ProcfsSource, pid: int) -> float:
    """Polls (as the pipeline would) until the process shows CPU time, within a few seconds."""
    with trio.fail_after(10):
        while True:
            await trio.sleep(0.2)
            batch = await poll_once(source)
            cpu = process_cpu(batch, pid)
            if cpu > 0:
                return cpu


async def test_an_announced_process_is_followed_until_it_ends(burner: subprocess.Popen[bytes]) -> None:
    events = EventBus()
    ctx = start_plugin(ProcfsPlugin, {}, events=events)
    [source] = [e.obj for e in ctx.elements if e.kind == "source"]
    first = await poll_once(source)  # the machine's baseline
    assert any(s.metric == "kernel_n_procs_running" for s in first.series)
    assert "meminfo_mem_total" in ctx.registry
    events.consumer_started(Consumer("process", str(burner.pid)))
    assert await poll_until_cpu(source, burner.pid) > 0
    batch = await poll_once(source)
    kinds = {s.attributes["kind"] for s in batch.series if s.metric == "memory_usage"}
    assert kinds == {"resident", "virtual", "shared"}
    assert any(s.metric == "kernel_cpu_time" and s.attributes == {"state": "user"} for s in batch.series)
    events.consumer_ended(Consumer("process", str(burner.pid)))
    assert process_cpu(await poll_once(source), burner.pid) == 0


async def test_a_process_that_starts_after_a_poll_is_counted_from_its_start() -> None:
    events = EventBus()
    ctx = start_plugin(ProcfsPlugin, {"kernel": False, "meminfo": False, "network": False}, events=events)
    [source] = [e.obj for e in ctx.elements if e.kind == "source"]
    await poll_once(source)
    # A short command: it has burned its CPU and exited (unreaped, as `agent exec` keeps it) before
    # the source's next poll; the poll still sees all of it.
    # It burns CPU time, not wall time: on a loaded machine it still uses 0.3 s of CPU.
    process = subprocess.Popen([sys.executable, "-c", "import time\nwhile time.process_time() < 0.3: pass"])
    events.consumer_started(Consumer("process", str(process.pid)))
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    with open(f"/proc/{process.pid}/stat") as f:
        final = parse_pid_stat(f.read())
    batch = await poll_once(source)
    process.wait()
    total = (final.utime + final.stime) / os.sysconf("SC_CLK_TCK")
    assert total >= 0.29 and process_cpu(batch, process.pid) == pytest.approx(total)


async def test_processes_matched_by_pattern(burner: subprocess.Popen[bytes]) -> None:
    ctx = start_plugin(ProcfsPlugin, {"processes": ["*procfs-test-burner*"], "meminfo": False})
    [source] = [e.obj for e in ctx.elements if e.kind == "source"]
    await poll_once(source)
    assert await poll_until_cpu(source, burner.pid) > 0
    batch = await poll_once(source)
    followed = {s.consumer.id for s in batch.series if s.consumer.kind == "process"}
    assert followed == {str(burner.pid)}


async def test_an_announced_process_that_is_already_gone_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    events = EventBus()
    ctx = start_plugin(ProcfsPlugin, {"kernel": False, "meminfo": False, "network": False}, events=events)
    [source] = [e.obj for e in ctx.elements if e.kind == "source"]
    process = subprocess.Popen(["true"])
    process.wait()
    events.consumer_started(Consumer("process", str(process.pid)))
    batch = await poll_once(source)
    assert len(batch) == 0
    assert f"announced process {process.pid} has already exited" in caplog.text
