"""torchrun restarts (``--max-restarts``): a fresh store namespace for every attempt.

Under torchrun the workers share the agent's TCPStore, which outlives a restart. With gloo the
default ``env://`` initialisation of torch 2.13 reuses the previous attempt's keys (each rank's
listening address), so after a restart ranks connect to addresses of dead processes and
``connectFullMesh`` times out. :func:`store_for_attempt` connects to the same store under the prefix
``mmtrain/attempt_<TORCHELASTIC_RESTART_COUNT>``, so every attempt rendezvouses afresh and resumes
from the newest checkpoint. Outside torchrun's agent store it returns None (plain ``env://``).
"""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist


def store_for_attempt(timeout: datetime.timedelta):
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"mmtrain/attempt_{attempt}", store)
