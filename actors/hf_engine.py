"""The transformers engine: batched sampling with real KV-cache reuse for shared prefixes.

Runs wherever torch runs (no vLLM needed). It keeps, after every call, the KV cache of each
continuation that ended on its token budget (the paths a tree will extend), keyed by the tokens it
covers. A request whose input starts with a kept key reuses that cache instead of recomputing the
prefix; only the tokens past it are prefilled (once per distinct input: sibling requests with
the same input share one prefill and each count their whole prefix as cached). Then all rows of the
call are decoded together: each row's cache (all its input but the last token) is left-padded to a
common length, the attention mask hides the padding, and position ids are the rows' true
positions. Finished rows are dropped from the batch cache (`batch_select_indices`); the kept caches
are cut out of it per row.

Simplifications: only the previous call's caches are kept (a tree extends only last-step paths;
a fallback branch re-prefills from the longest kept prefix, or from scratch); sampling is
inverse-CDF with temperature / top-k / top-p (`protocol.sampling`, whose log-probs it reports) and
one seeded generator per request, so the same seed gives the same continuation here but not the
same as vLLM's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from actors.engine import BatchEngine, EngineCounters, SamplingParams, SegmentRequest, SegmentResult
from protocol.config.engine import EngineConfig
from protocol.sampling import sampling_logits

PLAIN = SamplingParams()

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [1, heads, len, dim]


@dataclass
class _Row:
    request: SegmentRequest
    kv: KV  # cache of request.token_ids[:-1]
    generator: torch.Generator
    tokens: list[int]
    logprobs: list[float]
    finish: str = ""


def _kv_len(kv: KV) -> int:
    return int(kv[0][0].shape[2]) if kv else 0


class HfEngine(BatchEngine):
    def __init__(self, model_dir: str | Path, cfg: EngineConfig, policy_version: int = 0):
        super().__init__()
        dtype = getattr(torch, cfg.dtype)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        eos = self.model.generation_config.eos_token_id or self.model.config.eos_token_id
        self.eos_token_ids = frozenset(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
        self.policy_version = policy_version
        self.counters = EngineCounters()
        self._kept: dict[tuple[int, ...], KV] = {}

    # ------------------------------------------------------------------ prefix reuse
    def _longest_kept(self, ids: Sequence[int]) -> tuple[int, KV]:
        best: tuple[int, KV] = (0, [])
        for key, kv in self._kept.items():
            n = len(key)
            if best[0] < n <= len(ids) - 1 and tuple(ids[:n]) == key:
                best = (n, kv)
        return best

    @torch.no_grad()
    def _prefill(self, ids: Sequence[int], start: int, kv: KV) -> KV:
        """Cache of ids[:-1], computing only ids[start:-1] on top of `kv` (which covers ids[:start])."""
        todo = list(ids[start:-1])
        if not todo:
            return kv
        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache(config=self.model.config)
        x = torch.tensor([todo], device=self.device)
        pos = torch.arange(start, start + len(todo), device=self.device)[None]
        self.model(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in cache.layers]

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[_Row]) -> tuple[list[int], torch.Tensor]:
        """One token per row and the log-probs [B, V] of the distribution it was drawn from
        (`protocol.sampling`): inverse-CDF sampling with a uniform draw from each row's own generator;
        temperature 0 is greedy (its log-probs are the raw ones)."""
        x = logits.float()
        for b, r in enumerate(rows):
            s = r.request.sampling
            if s.temperature > 0 and s != PLAIN:  # per token: plain sampling needs no copy of the row
                x[b] = sampling_logits(x[b], s.temperature, s.top_k, s.top_p)
        logp = torch.log_softmax(x, -1)
        cdf = logp.exp().cumsum(-1)
        u = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(cdf.device)[:, None]
        picks = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=cdf.shape[1] - 1)[:, 0]
        greedy = x.argmax(-1)
        return [int(greedy[b]) if r.request.sampling.temperature == 0 else int(picks[b])
                for b, r in enumerate(rows)], logp

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[SegmentRequest]) -> list[SegmentResult]:
        rows: list[_Row] = []
        cached: list[int] = []
        prefilled: dict[tuple[int, ...], KV] = {}
        for r in requests:
            key = tuple(r.token_ids)
            if key in prefilled:  # a sibling of an earlier request: its prefix was computed once
                cached.append(len(key) - 1)
            else:
                n, kv = self._longest_kept(r.token_ids)
                prefilled[key] = self._prefill(r.token_ids, n, kv)
                cached.append(n)
            gen = torch.Generator().manual_seed(r.seed)
            rows.append(_Row(request=r, kv=prefilled[key], generator=gen, tokens=[], logprobs=[]))
        kept = self._decode(rows)
        self._kept = kept
        results = [SegmentResult(token_ids=row.tokens, logprobs=row.logprobs, finish=row.finish,  # type: ignore[arg-type]
                                 prompt_tokens=len(row.request.token_ids), cached_tokens=c,
                                 policy_version=self.policy_version)
                   for row, c in zip(rows, cached, strict=True)]
        return results

    def _decode(self, rows: list[_Row]) -> dict[tuple[int, ...], KV]:
        """Decode all rows together; return the caches of rows that stopped on their token budget."""
        if not rows:
            return {}
        n_layers = self.model.config.num_hidden_layers
        width = max(_kv_len(r.kv) for r in rows)
        pads = [width - _kv_len(r.kv) for r in rows]
        layers = []
        for li in range(n_layers):
            kv = [r.kv[li] if r.kv else (None, None) for r in rows]  # a one-token input has nothing cached
            layers.append((torch.cat([self._left_pad(k, p) for (k, _), p in zip(kv, pads, strict=True)]),
                           torch.cat([self._left_pad(v, p) for (_, v), p in zip(kv, pads, strict=True)])))
        cache = DynamicCache(ddp_cache_data=layers)
        mask = torch.tensor([[0] * p + [1] * (width - p) for p in pads], device=self.device)
        positions = torch.tensor([_kv_len(r.kv) for r in rows], device=self.device)
        feed = torch.tensor([r.request.token_ids[-1] for r in rows], device=self.device)
        live = list(range(len(rows)))  # row index of each batch position
        kept: dict[tuple[int, ...], KV] = {}
        while live:
            self.counters.engine_steps += 1
            self.counters.running_sum += len(live)
            mask = torch.cat([mask, torch.ones(len(live), 1, dtype=mask.dtype, device=self.device)], 1)
            out = self.model(input_ids=feed[:, None], attention_mask=mask, position_ids=positions[:, None],
                             past_key_values=cache, use_cache=True)
            nxt = []
            keep_pos = []
            sampled, logp = self._sample(out.logits[:, -1], [rows[i] for i in live])
            for b, i in enumerate(live):
                row, tok = rows[i], sampled[b]
                row.tokens.append(tok)
                row.logprobs.append(float(logp[b, tok]))
                if tok in self.eos_token_ids:
                    row.finish = "stop"
                elif len(row.tokens) >= row.request.max_new_tokens:
                    row.finish = "length"
                    pad = int((mask[b] == 0).sum())
                    kept[tuple(row.request.token_ids) + tuple(row.tokens[:-1])] = [
                        (layer.keys[b:b + 1, :, pad:], layer.values[b:b + 1, :, pad:]) for layer in cache.layers]
                else:
                    keep_pos.append(b)
                    nxt.append(tok)
            if len(keep_pos) < len(live):
                idx = torch.tensor(keep_pos, dtype=torch.long, device=self.device)
                cache.batch_select_indices(idx)
                mask, positions = mask[idx], positions[idx]
                live = [live[b] for b in keep_pos]
            feed = torch.tensor(nxt, dtype=torch.long, device=self.device)
            positions = positions + 1
        return kept

    def _left_pad(self, t: torch.Tensor | None, pad: int) -> torch.Tensor:
        if t is None:
            cfg = self.model.config
            heads = cfg.num_key_value_heads
            dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            return torch.zeros(1, heads, pad, dim, dtype=self.model.dtype, device=self.device)
        if pad == 0:
            return t
        return torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], 2)

    # ------------------------------------------------------------------ weights, text
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
        self.model.tie_weights()
        self._kept = {}  # caches computed with the old weights must not be reused
        self.policy_version = version

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def clear_prefix_cache(self) -> None:
        self._kept = {}

    def close(self) -> None:
        self._kept = {}
