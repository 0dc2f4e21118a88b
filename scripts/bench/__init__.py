"""shoal's benchmarks: not part of the installed package; run them from the repository root.

- ``python -m scripts.bench [--quick | --smoke] [--only ...] [--profile] [--out DIR]``: the
  suite, every figure against its target (``_suite`` says what each measurement does).
- ``python -m scripts.bench --compare REF``: the working tree's replay and ingest cost per
  event against a git ref's, each through its own command line (``_compare``).
- ``python -m scripts.bench.<name>``: one benchmark in depth: ``ingest`` (backlog and live
  ingest, rebuild), ``replay`` (replay throughput), ``restart`` (snapshot cost, restart
  times), ``consumer`` (nats-py consumer APIs), ``api`` (lookups during ingest).

They share the population model (``actors.population``), one engine harness (``_harness``:
the only place that builds an ``Engine``), and their measuring tools (``_common``,
``_machine``). Committed results are in ``results/``.
"""

__all__ = ()
