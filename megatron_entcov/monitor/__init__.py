"""What a run reports: TensorBoard scalars and their reductions, memory, histograms, dashboard, law image.

- ``metrics``: metric sums over ranks, TensorBoard event files and the console line (rank 0 only).
- ``step``: one RL step's metrics, each key with its reduction over ranks; ``timed()`` phases.
- ``memory``: GPU and host memory per phase of an RL step (the ``mem/*`` tags).
- ``histograms``: a uniform sample of the step's tokens (covariance, entropy), the same for every layout.
- ``dashboard``: the "Entropy control" custom-scalars layout and the run's identity as text.
- ``law_report``: ``megatron-entcov fit-law``, the R = -a*exp(H) + b fit and its image.
- ``server_metrics``: per-server rollout metrics from an engine's cumulative counters.
"""
