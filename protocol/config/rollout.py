"""Config of the tree sampler (actors/): TreePO, TreeRPO and independent sampling (ALGORITHMS.md §1.3, §2.1)."""

from typing import Literal

from pydantic import Field, model_validator

from protocol.config.base import Section


class RolloutConfig(Section):
    mode: Literal["treepo", "treerpo", "independent"] = Field(
        "treepo", description="treepo: budgeted segment tree with fallback; treerpo: full N-ary tree; "
        "independent: `width` i.i.d. samples per prompt (the baseline).")
    segment_tokens: int = Field(512, gt=0, description="l: max new tokens per segment (one engine call per path).")
    max_depth: int = Field(14, gt=0, description="d: max segments per path; the response cap is d*l.")
    width: int = Field(16, gt=0, description="w: leaves (complete trajectories) per prompt, exactly.")
    branching: int = Field(2, gt=0, description="b: children each active path asks for per step (tree_fixed_step_div).")
    init_branching: int = Field(2, gt=0, description="b0: copies of the root at the first step.")
    init_branching_max: int = Field(0, ge=0, description="If > init_branching, b0 ~ UniformInt[init_branching, "
                                    "min(this, width)] per prompt ('More Init Divergence'); 0 = fixed b0.")
    spread: Literal["fixed_avg", "logprob", "inverse_logprob", "norm_logprob", "norm_inverse_logprob",
                    "node_logprob", "node_inverse_logprob"] = Field(
        "fixed_avg", description="How the step budget T is split over active paths: evenly (remainder to the "
        "last path) or by softmax(+-(score-min)/tau) of a log-prob score (§1.3.4).")
    spread_temperature: float = Field(2.0, gt=0, description="tau of the probability-driven spreading.")
    spread_temperature_schedule: Literal["constant", "sinusoid_descending", "sinusoid_ascending"] = Field(
        "constant", description="Schedule of tau from spread_temperature_max to spread_temperature (descending) "
        "or back, over learner steps.")
    spread_temperature_max: float = Field(5.0, gt=0, description="tau_max of the schedule.")
    spread_temperature_steps: int = Field(100, gt=0, description="Learner steps (policy versions) the tau "
                                          "schedule spans; tau stays at its end value afterwards.")
    finish_rule: Literal["boxed_and_eos_first", "boxed_as_eos"] = Field(
        "boxed_and_eos_first", description="What ends a path as 'finished': a \\boxed{} answer and EOS in the "
        "same segment, or the boxed answer alone.")
    repetition_rule: Literal["least_prioritized", "most_prioritized", "off"] = Field(
        "least_prioritized", description="Where the repetition detector sits among the stop rules (§1.3.3).")
    repetition_window_chars: int = Field(32, gt=0, description="Substring length of the repetition detector.")
    repetition_min_count: int = Field(8, gt=1, description="Occurrences of one substring that mean repetition.")
    fallback_candidates: Literal["soft_boxed_and_eos", "finished_first", "finished_first_strict", "random_all",
                                 "longer_first"] = Field(
        "soft_boxed_and_eos", description="Which finished leaves a prompt with no active path re-branches from.")
    fallback_point: Literal["random", "from_start"] = Field(
        "random", description="random: cut at a uniformly chosen segment boundary; from_start: at the prompt.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(-1, description="Top-k sampling; -1 = off.")
    treerpo_children: int = Field(2, gt=0, description="TreeRPO N: children of every node.")
    treerpo_depth: int = Field(3, gt=0, description="TreeRPO D: max depth; the last step may run to the length cap.")
    treerpo_step_tokens: int = Field(128, gt=0, description="TreeRPO L_step: max tokens per step.")
    treerpo_max_tokens: int = Field(0, ge=0, description="TreeRPO response cap; the last step runs up to it "
                                    "(0 = treerpo_depth * treerpo_step_tokens).")
    short_answer_fallback: bool = Field(
        True, description="TreePO: while every leaf of a tree ended by EOS in its first segment, a fallback spawns "
        "all the leaves still missing at once from the prompt, instead of min(b, r) per candidate per wave (fewer "
        "sequential waves where the policy answers in one segment; BENCHMARKS.md, rollout).")
    prompts_per_step: int = Field(2, gt=0, description="Trees an actor keeps in flight at least (its pool): a "
                                  "finished tree's slot is refilled from a new lease (as the buffer's admission "
                                  "allows) before the engine's next step.")
    target_running: int = Field(
        32, ge=0, description="Sequences an actor keeps its engine busy with: beyond prompts_per_step, the pool "
        "keeps as many trees as hold about this many by the measured sequences per open tree (actors/pool.py; "
        "0: prompts_per_step trees only). 32 on CPU: a vLLM decode step there costs half per token what 8 rows cost "
        "(BENCHMARKS.md, rollout). Independent of learner.prompts_per_step; the buffer's admission still bounds "
        "the leases.")

    def response_cap(self, mode: str | None = None) -> int:
        """The most response tokens a path may have under `mode` (default: this config's): TreeRPO's
        `treerpo_max_tokens` (0: treerpo_depth * treerpo_step_tokens), else d * l. The samplers cut paths there and
        the overlong penalty counts from it."""
        if (mode or self.mode) == "treerpo":
            return self.treerpo_max_tokens or self.treerpo_depth * self.treerpo_step_tokens
        return self.max_depth * self.segment_tokens

    @model_validator(mode="after")
    def _check(self):
        if self.init_branching > self.width:
            raise ValueError("init_branching must be <= width")
        return self
