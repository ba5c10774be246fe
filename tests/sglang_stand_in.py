"""A stand-in for SGLang's ``/generate`` with routed experts (model.moe_routing_source=rollout), for the fake
server of tests/unit/rollout/conftest.py (``FakeServer(routes={"/generate": StandInGenerate(...)})``).

It answers as SGLang 0.5.23 does for ``{"input_ids": [...], "return_logprob": true, "return_routed_experts":
true}``: ``output_ids``, ``meta_info.output_token_logprobs`` ``[[logprob, token, None], ...]``,
``finish_reason``, ``weight_version``, and ``meta_info.routed_experts``: base64 of the int32 bytes of an array
[prompt + output tokens - 1, num_hidden_layers, num_experts_per_tok] (SGLang's detokenizer:
``pybase64.b64encode(tensor.numpy().tobytes()).decode("utf-8")``). The tokens and the routing of a prompt come from
the caller: a function of the prompt, so a test knows what every request was answered.

Example:
    route = StandInGenerate(lambda prompt: ([5, 6, 7], routing_of(prompt)))     # routing [len(prompt) + 2, L, k]
    server = FakeServer(routes={"/generate": route})
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Callable

import numpy as np

FAKE_SERVER_PATH = Path(__file__).resolve().parent / "unit" / "rollout" / "conftest.py"
"""The fake server's module (load it with script_modules.load_script outside that folder's tests)."""


def encode_routed_experts(routing: np.ndarray) -> str:
    """SGLang's encoding of one request's routing: base64 of its int32 bytes (shape not sent)."""
    return base64.b64encode(np.ascontiguousarray(routing, dtype=np.int32).tobytes()).decode("utf-8")


class StandInGenerate:
    """The ``/generate`` route: ``answer(prompt) -> (output_ids, routing | None)``; routing int32
    [len(prompt) + len(output_ids) - 1, layers, k] is sent only when the request asks for it. Records the
    routing it sent per prompt (``sent``)."""

    def __init__(self, answer: Callable[[list[int]], tuple[list[int], np.ndarray | None]]):
        self.answer = answer
        self.sent: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, body: dict) -> dict:
        prompt = [int(t) for t in body["input_ids"]]
        output_ids, routing = self.answer(prompt)
        meta = {"output_token_logprobs": [[-0.5 - 0.01 * i, int(t), None] for i, t in enumerate(output_ids)],
                "finish_reason": {"type": "length", "length": len(output_ids)}, "weight_version": "0"}
        if body.get("return_routed_experts") and routing is not None:
            assert routing.shape[0] == len(prompt) + len(output_ids) - 1, routing.shape
            self.sent[tuple(prompt)] = np.array(routing, dtype=np.int32)
            meta["routed_experts"] = encode_routed_experts(routing)
        return {"text": "", "output_ids": list(output_ids), "meta_info": meta}
