"""A run's life on disk and in the job: run directory, checkpoints, stop signals, launch, SLURM, logs."""
