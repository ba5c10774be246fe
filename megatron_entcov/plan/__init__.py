"""Plan before launch: what each rank holds in each phase of an RL step, and whether it fits its GPU.

Stub replaced below once the planner lands.
"""
