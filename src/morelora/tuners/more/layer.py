"""The MoRE layer: all of MoRE's math lives in this file.

For a frozen linear layer W0 (d_out x d_in), rank r, tasks T:

    A (r x d_in, Kaiming-uniform)   B (d_out x r, zeros)   E (T x d_in, N(0, 0.01))   G: Linear(d_in -> r)
    s_i = i / r (linear rank scaling)       expert k = ranks 1..k (a prefix)
    p_t = softmax(G(E[t]))                  k_t = argmax p_t + 1
    w_t = onehot(argmax p_t) + p_t - stopgrad(p_t)     (straight-through: value one-hot, gradient via p_t)
    delta_t(x) = (alpha / r) * w_t[k_t - 1] * B[:, :k_t] S (S A[:k_t] dropout(x))

A batch may mix tasks: each example gets a length-r coefficient vector c = (alpha/r) * s^2 * mask_k
(times the STE weight), applied between the two low-rank products, so one pair of matmuls serves
the whole batch:  delta(x) = ((dropout(x) A^T) * c[task]) B^T.  At inference the per-task
coefficients are computed once from the gate and cached until the router's weights change.

While training, `MoREModel` routes all layers of the same shape in one batched op and hands each layer
its (batch, r) coefficients for the call (`_routed`); it also collects the contrastive loss of all layers
at once from their stored pooled inputs (`_cl_input`). A layer called on its own (or a
configuration the batched path does not cover) computes both itself, as below.

The contrastive loss reads one vector per example from the layer input (`pool_tokens`): the first position
(the paper), or the mean / last of the real tokens of the attention mask that `MoREModel` hands the layer for
the call (`_cl_mask`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..base import TaskAdapterLayer, grow_rows, lora_pair, per_example
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


class MoRELinear(TaskAdapterLayer):
    """A frozen `nn.Linear` plus one LoRA module whose prefix ranks are routed per task."""

    # Per-call state set by MoREModel (batched routing, see model.py); None / False outside its calls.
    _routed: tuple[torch.Tensor, torch.Tensor] | None = None   # (the model's task ids (B,), coefficients (B, r))
    _cl_deferred: bool = False                                 # store the contrastive input for the model
    _cl_input: tuple[torch.Tensor, torch.Tensor] | None = None  # (float copy of the pooled x, its task ids)
    _cl_mask: torch.Tensor | None = None                       # (rows, tokens) attention mask of this layer's input
    call_state_names = ("_task_ids", "_routed", "_cl_deferred", "_cl_mask")   # reinstated when checkpointing recomputes
    call_output_names = ("aux_loss", "_cl_input")
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
        self._coef_cache: tuple[Any, torch.Tensor] | None = None
        self._batch_cache: tuple[torch.Tensor, int, torch.Tensor] | None = None
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

    def _rank_weights(self) -> torch.Tensor:
        """(T, r) per-rank weights (value: the chosen expert's 0/1 mask) before scaling."""
        if self.cfg.routing == "frozen":
            return self.expert_mask[self.chosen_experts()]
        p = self.router_probs()
        idx = p.argmax(-1)
        if self.cfg.routing == "hard" or not torch.is_grad_enabled():
            return self.expert_mask[idx]
        if self.cfg.ste_estimator == "prefix_mask":
            w = F.one_hot(idx, self.r).to(p.dtype) + p - p.detach()  # straight-through estimator
            return w @ self.expert_mask                                # m_j = sum_{k >= j} w_k
        p_k = p.gather(1, idx[:, None])                                # w[k] = 1 + p_k - stopgrad(p_k)
        return self.expert_mask[idx] * (p_k - p_k.detach() + 1.0)

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
            return self._rank_weights() * self.coef_scale
        key = self._router_key()
        if self._coef_cache is None or self._coef_cache[0] != key:
            with torch.no_grad():
                coef = self._rank_weights() * self.coef_scale
            self.__dict__["_coef_cache"] = (key, coef)
            self.__dict__["_batch_cache"] = None
        return self._coef_cache[1]

    def clear_cache(self) -> None:
        """Drop the cached routing: the next inference call runs the gate again."""
        self.__dict__["_coef_cache"] = None
        self.__dict__["_batch_cache"] = None

    def train(self, mode: bool = True) -> MoRELinear:
        self.clear_cache()   # entering or leaving evaluation: never carry routing across (weights may have moved)
        return super().train(mode)

    # ------------------------------------------------------------------ forward
    def _batch_coefficients(self, task_ids: torch.Tensor) -> torch.Tensor:
        if not self._uses_cache():
            return self.task_coefficients()[task_ids]
        table = self.task_coefficients()
        cached = self._batch_cache
        if cached is not None and cached[0] is task_ids and cached[1] is table:
            return cached[2]
        coef = table[task_ids]
        self.__dict__["_batch_cache"] = (task_ids, table, coef)   # plain attribute: skip nn.Module.__setattr__
        return coef

    def _handed_over(self, task_ids: torch.Tensor) -> torch.Tensor | None:
        """The model's task ids of this call when `task_ids` are them or their expansion (beams, choices)."""
        src = self._task_ids
        if src is None or task_ids is src:
            return src
        e = self._expanded
        return src if e is not None and e[0] is src and e[2] is task_ids else None

    def _routed_coefficients(self, task_ids: torch.Tensor) -> torch.Tensor | None:
        """(rows, r) coefficients the model computed for this call, expanded like the task ids; else None."""
        routed = self._routed
        if routed is None or self._handed_over(task_ids) is not routed[0]:
            return None
        src, coef = routed
        if task_ids is src:
            return coef
        return coef.repeat_interleave(task_ids.shape[0] // src.shape[0], 0)   # = expand_task_ids

    def low_rank_parts(self, x: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(z, B, 1): the adapter output is z @ B^T with z = (dropout(x) A^T) * c[task] (see the module doc)."""
        coef = self._routed_coefficients(task_ids)
        if coef is None:
            coef = self._batch_coefficients(task_ids)                   # (B, r)
        a = self.lora_A
        z = F.linear(self.lora_dropout(x) if self.training else x, a if a.dtype == x.dtype else a.to(x.dtype))
        z = z * per_example(coef, z)                                                          # (B, ..., r)
        if self.training and self.cfg.use_task_embeddings and self.cfg.contrastive_weight > 0:
            if self._cl_deferred and self._handed_over(task_ids) is not None:
                # a copy: a view of x would keep the whole layer input alive until backward
                self._cl_input = (self.pooled_input(x).to(torch.float32, copy=True), task_ids)
            else:
                self.aux_loss = self.contrastive_loss(x, task_ids)
        return z, self.lora_B, 1.0

    def pooled_input(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, d): the layer input as the contrastive loss reads it (`contrastive_pooling`, `pool_tokens`)."""
        return pool_tokens(x, self.contrastive_pooling, self._cl_mask)

    def contrastive_loss(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of normalize(pooled x) . normalize(E)^T / tau against the task id."""
        # a copy: a view of x would keep the whole layer input alive until backward
        h = F.normalize(self.pooled_input(x).float().clone(), dim=-1)
        e = F.normalize(self.task_embedding.float(), dim=-1)
        return F.cross_entropy(h @ e.T / self.cfg.contrastive_temperature, task_ids)

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
