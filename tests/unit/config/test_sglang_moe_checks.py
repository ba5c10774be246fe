"""Qwen3-MoE settings SGLang's own model class cannot serve are refused at config load, naming the field, the
value and the fix; the embedded engine takes them."""

from __future__ import annotations

import re

import pytest

from megatron_entcov.config import load_config

MOE = ["model.num_experts=4", "model.moe_router_topk=2", "model.num_layers=2", "rollout.engine=sglang"]


def test_a_tied_moe_model_is_refused_with_sglang():
    with pytest.raises(ValueError) as err:
        load_config(None, MOE + ["model.tie_word_embeddings=true"])
    assert str(err.value).startswith("model.tie_word_embeddings=True is invalid: SGLang's Qwen3-MoE model keeps its "
                                     "own lm_head")
    assert str(err.value).endswith("use an untied checkpoint (the released Qwen3-MoE models are untied) or "
                                   "rollout.engine=local")


@pytest.mark.parametrize("setting, field", [("model.moe_dense_layers=[0]", "model.moe_dense_layers=[0]"),
                                            ("model.moe_layer_freq=2", "model.moe_layer_freq=2")])
def test_dense_layers_are_refused_with_sglang(setting, field):
    with pytest.raises(ValueError, match="^" + re.escape(f"{field} is invalid: SGLang's Qwen3-MoE model makes every "
                                                         "layer sparse")):
        load_config(None, MOE + ["model.tie_word_embeddings=false", setting])


def test_the_embedded_engine_and_an_all_moe_untied_model_pass():
    load_config(None, MOE + ["model.tie_word_embeddings=false"])
    load_config(None, MOE[:-1] + ["model.tie_word_embeddings=true", "model.moe_dense_layers=[0]"])
