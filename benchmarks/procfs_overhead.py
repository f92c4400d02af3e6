"""procfs overhead benchmark: the agent's CPU and memory while `procfs` follows 200 processes at 1 s polls.

    python benchmarks/procfs_overhead.py [--processes 200] [--seconds 30] [--poll 1s]

Why: the issue asks what following many processes costs (Alumet publishes no figure; its procfs
defaults poll processes every 2 s and the kernel every 5 s). Two agents run one after the other in the
same run, each as a real `agent` process with `procfs` and the `discard` output:

- baseline: procfs with its machine counters (kernel, meminfo, network) and no process;
- followed: the same, plus `processes = ["*procfs-bench-sleep*"]`, matching N idle processes started
  for the benchmark (a symlink to `sleep` named procfs-bench-sleep, so that nothing else matches).

For each, once the agent logs that it is ready, its CPU time (user + system, from /proc) is sampled over
`--seconds` and its resident memory at the end. Figures: CPU use as a percentage of one core, RSS in MiB,
and the ratio followed / baseline. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

MARKER = "procfs-bench-sleep"


def wait_ready(process: subprocess.Popen[str], timeout: float = 60.0) -> None:
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise SystemExit(f"the agent exited before it was ready (code {process.wait()})")
        if "ready" in line and "agent" in line:
            return
    raise SystemExit("the agent did not get ready within 60 s")


def measure(config: str, seconds: float, workdir: Path) -> dict[str, float]:
    path = workdir / "agent.toml"
    path.write_text(config)
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--config", str(path), "--log-level", "info"],
        cwd=workdir,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_ready(process)
        # Drain stderr in the background so that the agent never blocks on a full pipe.
        drain = subprocess.Popen(["cat"], stdin=process.stderr, stdout=subprocess.DEVNULL)
        agent = psutil.Process(process.pid)
        time.sleep(2)  # let the first polls (and the pattern matching of every process) pass
        before, started = agent.cpu_times(), time.monotonic()
        time.sleep(seconds)
        after, elapsed = agent.cpu_times(), time.monotonic() - started
        rss = agent.memory_info().rss
    finally:
        process.terminate()
        process.wait(timeout=30)
    drain.wait(timeout=10)
    cpu = (after.user + after.system) - (before.user + before.system)
    return {"cpu_percent_of_one_core": 100.0 * cpu / elapsed, "rss_mib": rss / 2**20}


def config(poll: str, patterns: list[str]) -> str:
    return (
        "[agent]\nself_metrics_interval = \"0s\"\n"
        f"[plugins.procfs]\nenable = true\npoll_interval = \"{poll}\"\nflush_interval = \"{poll}\"\n"
        f"processes = {json.dumps(patterns)}\nmax_processes = 100000\n"
        "[plugins.discard]\nenable = true\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--poll", default="1s")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sleep = shutil.which("sleep")
        assert sleep is not None
        link = workdir / MARKER
        link.symlink_to(sleep)
        sleepers = [subprocess.Popen([str(link), "3600"]) for _ in range(args.processes)]
        try:
            baseline = measure(config(args.poll, []), args.seconds, workdir)
            followed = measure(config(args.poll, [f"*{MARKER}*"]), args.seconds, workdir)
        finally:
            for s in sleepers:
                s.kill()
            for s in sleepers:
                s.wait()

    ratio = followed["cpu_percent_of_one_core"] / max(baseline["cpu_percent_of_one_core"], 1e-9)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"baseline (procfs, machine counters only): {baseline['cpu_percent_of_one_core']:.2f} % of one core,"
          f" RSS {baseline['rss_mib']:.1f} MiB")
    print(f"procfs following {args.processes} processes at {args.poll}: {followed['cpu_percent_of_one_core']:.2f} %"
          f" of one core, RSS {followed['rss_mib']:.1f} MiB ({ratio:.1f}x the baseline's CPU)")
    print(json.dumps({
        "processes": args.processes,
        "poll": args.poll,
        "seconds": args.seconds,
        "baseline_cpu_percent": round(baseline["cpu_percent_of_one_core"], 3),
        "baseline_rss_mib": round(baseline["rss_mib"], 1),
        "followed_cpu_percent": round(followed["cpu_percent_of_one_core"], 3),
        "followed_rss_mib": round(followed["rss_mib"], 1),
        "cpu_ratio": round(ratio, 2),
    }))


if __name__ == "__main__":
    main()
