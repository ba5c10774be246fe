"""Plan before launch: what each rank holds in each phase of an RL step, whether it fits its GPU, and what would.

- ``states``: weights, gradient buffers and optimizer state per pipeline stage, from the trainer's own builders on
  the meta device in a fake world (exact to the byte);
- ``activations``: the activation model of one micro-batch and the pipeline's in-flight count;
- ``servers``: the rollout engine's share of a GPU per phase;
- ``phases``: one rank role's bytes per phase and its peak; ``planner``: every role of a config;
- ``advice``: the changes that would fit, each planned again; ``report``: the table and the JSON;
- ``command``: ``megatron-entcov plan`` and the trainer's start-up check.

Example:
    plan = plan_with_advice(load_config("configs/qwen2.5-7b_kl_cov.yaml"))
    print(plan_table(plan)); plan.fits
Design notes: docs/design/plan.md
"""

from megatron_entcov.plan.advice import Advice, plan_with_advice
from megatron_entcov.plan.planner import Plan, make_plan
from megatron_entcov.plan.report import plan_json, plan_table

__all__ = ["Plan", "Advice", "make_plan", "plan_with_advice", "plan_json", "plan_table"]
