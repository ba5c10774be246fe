"""A run's life on disk and in the job: run directory, checkpoints, stop signals, launch, SLURM, logs.

- ``run_dir``: who owns a run directory (its identity, run.json, and its lock, run.lock).
- ``checkpoint``: Checkpointer, atomic saves, collective loads, fall-back to the last step that loads.
- ``stop``: SIGTERM/SIGINT/SIGUSR1 -> checkpoint and stop at the next step boundary, on every rank.
- ``launch``: the ``--nproc`` launcher (torchrun on this machine, supervised, sockets on 127.0.0.1).
- ``slurm``: what slurm/*.sbatch ask of the package (``python -m megatron_entcov.run.slurm COMMAND``).
- ``logs``: logging set-up for the command line and the tools (third-party noise filtered).
- ``disk``: free space where a path will be written, and whether a failure was a full disk.

Design notes: docs/design/run.md
"""
