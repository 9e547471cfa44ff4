"""The MoRE layer: all of MoRE's math lives in this file (the model only calls it).

For a frozen linear layer W0 (d_out x d_in), rank r, tasks T:

    A (r x d_in, Kaiming-uniform)   B (d_out x r, zeros)   E (T x d_in, N(0, 0.01))   G: Linear(d_in -> r)
    s_i = i / r (linear rank scaling)       expert k = ranks 1..k (a prefix)
    p_t = softmax(G(E[t]))                  k_t = argmax p_t + 1
    w_t = onehot(argmax p_t) + p_t - stopgrad(p_t)     (straight-through: value one-hot, gradient via p_t)
    delta_t(x) = (alpha / r) * w_t[k_t - 1] * B[:, :k_t] S (S A[:k_t] dropout(x))

A batch may mix tasks: each example gets a length-r coefficient vector c = (alpha/r) * s^2 * mask_k
(times the STE weight), applied between the two low-rank products, so one pair of matmuls serves
the whole batch:  delta(x) = ((dropout(x) A^T) * c[task]) B^T.  At inference the per-task
coefficients are computed once from the gate and cached until the router's weights change (`RoutingCache`).

The math is written once, as pure functions over any number of leading dimensions, and every path calls them:
`rank_coefficients` (softmax probabilities -> argmax expert -> straight-through weights -> coefficients) and
`contrastive_logits` (normalize(h) . normalize(E)^T / tau). A layer on its own calls them for its (T, r) table
and its (rows, d) input; while training, `MoREModel` calls them for all layers of one shape at once, L = that
many layers (`routing over (L, rows, r)`, one contrastive `bmm` over `(L, rows, T)`), and hands each layer its
`(rows, r)` coefficients through the call's `MoRECall`, in which the layers leave their pooled inputs for it.
A layer called with other task ids than the model's (or a configuration the batched path does not cover)
routes and computes its contrastive loss itself.

The contrastive loss reads one vector per example from the layer input (`pool_tokens`): the first position
(the paper), or the mean / last of the real tokens of the attention mask that `MoREModel` hands the layer for
the call (`MoRECall.masks`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..base import CallState, TaskAdapterLayer, grow_rows, lora_pair, per_example
from .config import MoREConfig


class _StepCounter:
    """How many optimizer steps this process has taken (any optimizer): part of the routing cache key."""

    count = 0

    @classmethod
    def bump(cls, *_: Any) -> None:
        cls.count += 1


register_optimizer_step_post_hook(_StepCounter.bump)


def expert_masks(r: int, structure: str, seed: int = 0) -> torch.Tensor:
    """(r, r) 0/1 table: row k-1 marks the ranks that expert k uses."""
    if structure == "prefix":
        return torch.tril(torch.ones(r, r))
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(r, r)
    for k in range(1, r + 1):
        masks[k - 1, torch.randperm(r, generator=g)[:k]] = 1.0
    return masks


def rank_coefficients(probs: torch.Tensor, expert_mask: torch.Tensor, coef_scale: torch.Tensor,
                      estimator: str | None = "onehot") -> torch.Tensor:
    """MoRE's routing: per-rank coefficients (..., r) from router probabilities p (..., r), for one layer's tasks
    or examples (T or rows, r) or for L layers at once (L, rows, r).

    Value: `coef_scale` ((alpha / r) s^2) times the rank mask of expert k = argmax p. `estimator` sets the gradient:
    "onehot" (straight-through): the chosen expert's weight is 1 + p_k - stopgrad(p_k), so the gradient reaches p
    through p_k; "prefix_mask": w = onehot(k) + p - stopgrad(p) and the mask is w @ expert_mask (m_j = sum_{k>=j}
    w_k), a gradient for every p_j; None: none (the hard routing, and inference).
    """
    idx = probs.argmax(-1)
    if estimator is None:
        return expert_mask[idx] * coef_scale
    if estimator == "prefix_mask":
        w = F.one_hot(idx, probs.shape[-1]).to(probs.dtype) + probs - probs.detach()   # straight-through estimator
        return (w @ expert_mask) * coef_scale
    p_k = probs.gather(-1, idx.unsqueeze(-1))                     # w[k] = 1 + p_k - stopgrad(p_k)
    return expert_mask[idx] * (p_k - p_k.detach() + 1.0) * coef_scale


def contrastive_logits(h: torch.Tensor, e: torch.Tensor, temperature: float) -> torch.Tensor:
    """normalize(h) . normalize(e)^T / tau, (..., rows, T) in float32, from pooled layer inputs h (..., rows, d)
    and task embeddings e (..., T, d): one layer, or L layers at once (leading L).

    The logits are divided by e's norms instead of normalizing all of e (rows x T divisions, not T x d). `h` is
    read as it is: pass a copy (a view of the layer input would keep all of it alive until backward).
    """
    h = F.normalize(h.float(), dim=-1)
    e = e.float()
    norms = e.norm(dim=-1).clamp_min(1e-12).unsqueeze(-2)                              # (..., 1, T)
    return torch.matmul(h, e.transpose(-1, -2)) / (norms * temperature)


def pool_tokens(x: torch.Tensor, pooling: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The input the contrastive loss reads, (batch, d), from `x` (batch, tokens, d) (other shapes: x itself).

    "first": x[:, 0]; "mean": the mean over the tokens where `mask` (batch, tokens) is nonzero; "last": the last
    such token (right or left padding alike). Without a mask (or one whose shape does not fit `x`: its rows may
    be a divisor of x's, as for beams) "mean" and "last" use every position.
    """
    if x.dim() != 3 or pooling == "first":
        return x[:, 0, :] if x.dim() == 3 else x
    rows, tokens = x.shape[:2]
    if mask is not None and mask.shape[-1] == tokens and mask.shape[0] != rows and rows % mask.shape[0] == 0:
        mask = mask.repeat_interleave(rows // mask.shape[0], 0)
    if mask is None or mask.shape != (rows, tokens):
        return x.mean(1) if pooling == "mean" else x[:, -1, :]
    if pooling == "mean":   # bmm: keeps only the mask for backward, not the layer input
        m = mask.to(x.dtype).unsqueeze(1)                                                    # (B, 1, L)
        return torch.bmm(m, x).squeeze(1) / m.sum(-1).clamp_min(1)
    last = (mask.ne(0).long() * torch.arange(1, tokens + 1, device=mask.device)).argmax(-1)   # last real token
    return x[torch.arange(rows, device=x.device), last]


class MoRECall(CallState):
    """One call of a `MoREModel`: what it hands its layers beyond the task ids, and what they leave for it.

    Inputs (training forward only; empty otherwise): `routed`, each layer's (B, r) coefficients for the call's B
    task ids, from the model's batched routing (`stacked_e`: the stacked task embeddings (L, T, d) per layer group
    it routed, reused by the contrastive loss); `masks`, the attention mask of each layer's input, (rows, tokens),
    for "mean" / "last" contrastive pooling; `defer_contrastive`: layers leave their pooled input in `pooled` (the
    output: layer -> (float32 copy of the pooled input, its task ids)) and the model computes the loss of all
    layers at once after the forward.
    """

    __slots__ = ("routed", "stacked_e", "masks", "defer_contrastive", "pooled")

    def __init__(self, task_ids: torch.Tensor | None, routed: dict[MoRELinear, torch.Tensor] | None = None,
                 stacked_e: dict[int, torch.Tensor] | None = None,
                 masks: dict[MoRELinear, torch.Tensor | None] | None = None, defer_contrastive: bool = False) -> None:
        super().__init__(task_ids)
        self.routed = routed if routed is not None else {}
        self.stacked_e = stacked_e if stacked_e is not None else {}
        self.masks = masks if masks is not None else {}
        self.defer_contrastive = defer_contrastive
        self.pooled: dict[MoRELinear, tuple[torch.Tensor, torch.Tensor]] = {}

    def for_recompute(self) -> MoRECall:
        call = MoRECall(self.task_ids, self.routed, self.stacked_e, self.masks, self.defer_contrastive)
        call.expanded = self.expanded   # the same expanded ids: the layers recognise them as the call's
        return call


class RoutingCache:
    """One layer's routing at inference: the (T, r) coefficient table computed for one state of the router weights
    (`key`), and its rows for the last task ids it was indexed with (`ids` -> `rows`)."""

    __slots__ = ("key", "table", "ids", "rows")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.key: tuple | None = None
        self.table: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None


class MoRELinear(TaskAdapterLayer):
    """A frozen `nn.Linear` plus one LoRA module whose prefix ranks are routed per task."""

    call_state: MoRECall | None
    per_task_param_names = ("task_embedding", "router_logits", "frozen_expert")   # one row per task

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: MoREConfig) -> None:
        super().__init__(base_layer, num_tasks)
        r, d_in = config.r, self.in_features
        self.r = r
        self.cfg = config
        #: how the contrastive loss reads the input: "first" | "mean" | "last" (MoREModel resolves "auto" per model;
        #: a layer built on its own takes "first", the paper's)
        self.contrastive_pooling = "first" if config.contrastive_pooling == "auto" else config.contrastive_pooling
        self.scaling = config.lora_alpha / r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = lora_pair(d_in, self.out_features, r, config.init_lora_weights)
        names = ["lora_A", "lora_B"]
        if config.use_task_embeddings:
            self.task_embedding = nn.Parameter(torch.randn(num_tasks, d_in) * config.task_embedding_std)
            self.gate = nn.Linear(d_in, r)
            names += ["task_embedding", "gate"]
        else:
            self.router_logits = nn.Parameter(torch.randn(num_tasks, r) * config.task_embedding_std)
            names += ["router_logits"]
        # -1 = not fixed yet; only used by routing="frozen" (the official code's behaviour)
        self.register_buffer("frozen_expert", torch.full((num_tasks,), -1, dtype=torch.long))
        if config.routing == "frozen":
            names.append("frozen_expert")
        self.adapter_param_names = tuple(names)
        s = torch.arange(1, r + 1, dtype=torch.float32) / r if config.rank_scaling == "linear" else torch.ones(r)
        self.register_buffer("rank_scale", s, persistent=False)
        self.register_buffer("coef_scale", s**2 * self.scaling, persistent=False)   # (alpha / r) s^2
        self.register_buffer("expert_mask", expert_masks(r, config.expert_structure, config.seed), persistent=False)
        #: the inference routing, recomputed when the router's weights change; dropped by `clear_cache`
        self.routing_cache = RoutingCache()
        dev = base_layer.weight.device
        self.to(dev)

    # ------------------------------------------------------------------ routing
    def router_probs(self) -> torch.Tensor:
        """p: (T, r) softmax over the r rank experts for every task."""
        if self.cfg.use_task_embeddings:
            logits = self.gate(self.task_embedding.to(self.gate.weight.dtype))
        else:
            logits = self.router_logits
        return logits.float().softmax(-1)

    def chosen_experts(self) -> torch.Tensor:
        """Index (0-based) of the expert each task uses now: (T,) long."""
        with torch.no_grad():
            if self.cfg.routing == "frozen":
                self._freeze_unset()
                return self.frozen_expert.clone()
            return self.router_probs().argmax(-1)

    def task_ranks(self) -> list[int]:
        """Number of ranks each task uses in this layer."""
        return self.expert_mask[self.chosen_experts()].sum(-1).long().tolist()

    def _freeze_unset(self) -> None:
        unset = self.frozen_expert < 0
        if bool(unset.any()):
            with torch.no_grad():
                self.frozen_expert[unset] = self.router_probs().argmax(-1)[unset]

    def _routed_table(self) -> torch.Tensor:
        """(T, r) coefficients of every task from the router (`rank_coefficients`)."""
        if self.cfg.routing == "frozen":
            return self.expert_mask[self.chosen_experts()] * self.coef_scale
        hard = self.cfg.routing == "hard" or not torch.is_grad_enabled()
        return rank_coefficients(self.router_probs(), self.expert_mask, self.coef_scale,
                                 None if hard else self.cfg.ste_estimator)

    def _router_key(self) -> tuple:
        # read through the module dicts: this runs in every inference call of every layer. The version
        # counters catch in-place edits through autograd-visible ops; the optimizer-step count catches fused /
        # foreach optimizer kernels, which do not bump them; the storage pointer catches `p.data = ...`;
        # `train()` / `eval()` and `load_adapter` clear the cache outright.
        own = self._parameters
        if self.cfg.use_task_embeddings:
            gate = self._modules["gate"]._parameters
            params = (own["task_embedding"], gate["weight"], gate["bias"])
        else:
            params = (own["router_logits"],)
        return (_StepCounter.count, *[(id(p), p._version, p.data_ptr()) for p in params],
                self._buffers["frozen_expert"]._version)

    def _uses_cache(self) -> bool:
        """Cached (T, r) coefficients at inference (eval mode or autograd off); the live STE routing otherwise."""
        return self.cfg.routing == "frozen" or not self.training or not torch.is_grad_enabled()

    def task_coefficients(self) -> torch.Tensor:
        """(T, r): (alpha / r) * s^2 * rank weights. Cached (no gate run) at inference."""
        if not self._uses_cache():
            return self._routed_table()
        cache = self.routing_cache
        key = self._router_key()
        if cache.table is None or cache.key != key:
            with torch.no_grad():
                table = self._routed_table()
            cache.clear()
            cache.key, cache.table = key, table
        return cache.table

    def clear_cache(self) -> None:
        """Drop the cached routing: the next inference call runs the gate again."""
        self.routing_cache.clear()

    def train(self, mode: bool = True) -> MoRELinear:
        self.clear_cache()   # entering or leaving evaluation: never carry routing across (weights may have moved)
        return super().train(mode)

    # ------------------------------------------------------------------ forward
    def _batch_coefficients(self, task_ids: torch.Tensor) -> torch.Tensor:
        if not self._uses_cache():
            return self.task_coefficients()[task_ids]
        table = self.task_coefficients()
        cache = self.routing_cache
        if cache.ids is task_ids:
            return cache.rows
        cache.ids, cache.rows = task_ids, table[task_ids]
        return cache.rows

    def _call_ids(self, call: MoRECall | None, task_ids: torch.Tensor) -> bool:
        """Are `task_ids` the model's ids of this call, or their expansion (beams, choices)?"""
        return call is not None and call.task_ids is not None and (
            task_ids is call.task_ids or call.expanded.get(task_ids.shape[0]) is task_ids)

    def _routed_coefficients(self, call: MoRECall | None, task_ids: torch.Tensor) -> torch.Tensor | None:
        """(rows, r) coefficients the model computed for this call, expanded like the task ids; else None."""
        coef = call.routed.get(self) if call is not None and call.routed else None
        if coef is None or not self._call_ids(call, task_ids):
            return None
        if task_ids is call.task_ids:
            return coef
        return coef.repeat_interleave(task_ids.shape[0] // call.task_ids.shape[0], 0)   # = expand_task_ids

    def low_rank_parts(self, x: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(z, B, 1): the adapter output is z @ B^T with z = (dropout(x) A^T) * c[task] (see the module doc)."""
        call = self.call_state
        coef = self._routed_coefficients(call, task_ids)
        if coef is None:
            coef = self._batch_coefficients(task_ids)                   # (B, r)
        a = self.lora_A
        z = F.linear(self.lora_dropout(x) if self.training else x, a if a.dtype == x.dtype else a.to(x.dtype))
        z = z * per_example(coef, z)                                                          # (B, ..., r)
        if self.training and self.cfg.use_task_embeddings and self.cfg.contrastive_weight > 0:
            if call is not None and call.defer_contrastive and self._call_ids(call, task_ids):
                # a copy: a view of x would keep the whole layer input alive until backward
                call.pooled[self] = (self.pooled_input(x).to(torch.float32, copy=True), task_ids)
            else:
                self.aux_loss = self.contrastive_loss(x, task_ids)
        return z, self.lora_B, 1.0

    def input_mask(self) -> torch.Tensor | None:
        """The attention mask (rows, tokens) of this layer's input in the call in progress, for "mean" / "last"
        contrastive pooling; None outside a training forward, or where the model has none."""
        call = self.call_state
        return call.masks.get(self) if call is not None else None

    def pooled_input(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, d): the layer input as the contrastive loss reads it (`contrastive_pooling`, `pool_tokens`)."""
        return pool_tokens(x, self.contrastive_pooling, self.input_mask())

    def contrastive_loss(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of normalize(pooled x) . normalize(E)^T / tau against the task id (`contrastive_logits`)."""
        h = self.pooled_input(x).to(torch.float32, copy=True)   # a copy: see `contrastive_logits`
        return F.cross_entropy(contrastive_logits(h, self.task_embedding, self.cfg.contrastive_temperature), task_ids)

    # ------------------------------------------------------------------ merge / export
    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(S A[sel], B[:, sel] S, alpha / r) for the ranks `sel` of task `task`'s expert."""
        sel = self.expert_mask[self.chosen_experts()[task]].nonzero().flatten()
        s = self.rank_scale[sel]
        return self.lora_A[sel] * s[:, None], self.lora_B[:, sel] * s[None, :], self.scaling

    def add_task(self, init_from: int | None = None) -> None:
        super().add_task(init_from)
        if self.cfg.use_task_embeddings:
            self.task_embedding = grow_rows(self.task_embedding, init_from, self.cfg.task_embedding_std)
        else:
            self.router_logits = grow_rows(self.router_logits, init_from, self.cfg.task_embedding_std)
        new = self.frozen_expert[init_from : init_from + 1] if init_from is not None else \
            torch.full((1,), -1, dtype=torch.long, device=self.frozen_expert.device)
        self.frozen_expert = torch.cat([self.frozen_expert, new])
        self.clear_cache()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, routing={self.cfg.routing}, pooling={self.contrastive_pooling}"
