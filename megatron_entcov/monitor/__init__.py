"""What a run reports: TensorBoard scalars and their reductions, memory, histograms, dashboard, law image."""
