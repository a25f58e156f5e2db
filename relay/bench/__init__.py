"""Relay's own benchmark (``make bench``, ``python -m relay.bench``).

It starts a private redis-server and real ``relay serve`` processes, drives them from
WebSocket clients (``relay.bench.loadgen``) and a publisher (``relay_cli.bench_publisher``:
backend_adapter.AsyncPublisher, so it stands above both packages) in processes of their
own, measures every process's CPU and memory from /proc, and writes a table, a JSON file
and a latency plot. docs/benchmarks.md explains the scenarios and each figure.

    relay.bench.procs      child processes (process groups, stop by pid) and /proc
    relay.bench.harness    Bench: owns a run's processes; connect and publish phases
    relay.bench.scenarios  throughput, latency, memory, storm, soak
    relay.bench.report     markdown table, JSON, latency plot
    relay.bench.runner     command line
"""

__all__: list[str] = []
