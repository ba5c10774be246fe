"""Process groups and every collective: the parallel layout, the collective helpers, sockets."""
