"""The sampler a rollout config asks for."""

from __future__ import annotations

from collections.abc import Callable

from actors.engine import Engine
from actors.independent_sampler import IndependentSampler
from actors.sampler_base import SamplerBase
from actors.tree_sampler import TreePOSampler
from actors.tree_state import Scorer
from actors.treerpo_sampler import TreeRPOSampler
from protocol.config.rollout import RolloutConfig

SAMPLERS: dict[str, type[SamplerBase]] = {"treepo": TreePOSampler, "treerpo": TreeRPOSampler,
                                          "independent": IndependentSampler}


def make_sampler(engine: Engine, cfg: RolloutConfig, scorer: Scorer | None = None, run_id: str = "run",
                 seed: int = 0, tree_prefix: str = "tree", before_step: Callable[[], None] | None = None) -> SamplerBase:
    return SAMPLERS[cfg.mode](engine, cfg, scorer=scorer, run_id=run_id, seed=seed, tree_prefix=tree_prefix,
                              before_step=before_step)
