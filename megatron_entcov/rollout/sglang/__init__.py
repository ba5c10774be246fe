"""The SGLang rollout engine: servers over HTTP, supervised, with verified weight syncs.

- ``engine``: :class:`SGLangEngine`, the rollout protocol over a pool of servers.
- ``pool``: server states (live, dead, restarting, stale), request placement, restarts, fan-out settling.
- ``server``: one launched ``sglang.launch_server`` process and the server venv.
- ``http``: JSON over HTTP, errors, the concurrent fan-out.
- ``protocol``: the wire format of /generate and /model_info.
- ``placement``: which servers and GPUs belong to which data-parallel replica.
- ``transports``: weight transports ('disk', 'distributed', 'tensor'), talking to the pool.

The trainer process never imports sglang itself.
"""

from megatron_entcov.rollout.sglang.engine import SGLangEngine
from megatron_entcov.rollout.sglang.http import NoServerLeftError, ServerError, http_json

__all__ = ["SGLangEngine", "ServerError", "NoServerLeftError", "http_json"]
