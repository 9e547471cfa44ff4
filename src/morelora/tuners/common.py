"""What the methods share beyond `base`: config fields and checks, token routing, expert layers, balance losses.

A method is one file that imports from here and from `base` only (methods never import each other):

* checks and configs: `check`, `check_int`, `LowRankConfig` (r, alpha, dropout, init: every LoRA-style method),
  `LoRAExpertsConfig` (plus experts, top-k, router init: the token-routed LoRA-expert methods);
* token routing: `token_router` builds the per-token softmax router, `router_softmax` reads it, `route` turns its
  probabilities into mixing weights (all, or the top-k renormalized);
* layers: `TokenRoutedLayer` (a change that depends on each token: no merge, no export) and `LoRAExpertsLinear`
  (n LoRA experts mixed per token, two matmuls whatever n is), which MixLoRA, MoLoRA, LoRAMoE, MoLA and AdaMoE
  specialise by their routing and auxiliary loss;
* balance losses: `load_balancing_loss` (Switch / Mixtral, the top-k form MixLoRA's code uses);
* default targets: `ffn_target_modules` (the FFN linear layers per architecture), `default_targets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoreLoraError, TaskAdapterConfig, TaskAdapterLayer, lora_pair, model_type_of, no_default_targets


# --------------------------------------------------------------------------------------------- checks and configs
def check(condition: bool, message: str) -> None:
    """Raise `MoreLoraError(message)` unless `condition`."""
    if not condition:
        raise MoreLoraError(message)


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """Raise MoreLoraError unless `value` is an int >= `minimum` (bools are refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MoreLoraError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class LowRankConfig(TaskAdapterConfig):
    """LoRA fields shared by the baselines (defaults as MoRE's: r 8, alpha 32, dropout 0.1)."""

    r: int = field(default=8, metadata={"help": "LoRA rank (per expert / head where the method says so)."})
    lora_alpha: float = field(default=32, metadata={"help": "Scale alpha / r of the low-rank change."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the adapter input."})
    init_lora_weights: bool = field(
        default=True, metadata={"help": "B = 0 at init (identity change); False: random B (for tests)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MoreLoraError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha <= 0:
            raise MoreLoraError(f"lora_alpha must be > 0, got {self.lora_alpha}")


@dataclass
class LoRAExpertsConfig(LowRankConfig):
    """Fields of every method built from token-routed LoRA experts (r, alpha, dropout: per expert)."""

    num_experts: int = field(default=4, metadata={"help": "LoRA experts per adapted layer."})
    top_k: int | None = field(
        default=None, metadata={"help": "Mix only the k most probable experts (renormalized); None: all."})
    router_init_std: float = field(default=0.02, metadata={"help": "Init std of the router weights."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_experts", self.num_experts)
        if self.top_k is not None:
            check_int("top_k", self.top_k)
        check(self.router_init_std >= 0, f"router_init_std must be >= 0, got {self.router_init_std}")


# --------------------------------------------------------------------------------------------- default targets
# PEFT has no table of whole FFNs (its IA3 feed-forward table names only the down projection): this is one, by model
# type, checked against tiny models of every type in tests/test_architectures.py. Suffixes with a parent
# ("mlp.c_proj") where the attention has a layer of the same name.
_BERT_FFN = r"(.*\.)?layer\.\d+\.(intermediate|output)\.dense"   # not attention.output.dense
_LLAMA_FFN = ["gate_proj", "up_proj", "down_proj"]
_GPT2_FFN = ["mlp.c_fc", "mlp.c_proj"]                           # not attn.c_proj
_FC_FFN = ["fc1", "fc2"]
_NEOX_FFN = ["dense_h_to_4h", "dense_4h_to_h"]
#: model type -> the FFN linear (or Conv1D) layers (names as target_modules takes them)
FFN_TARGET_MODULES: dict[str, list[str] | str] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2"], _BERT_FFN),
    "t5": ["wi", "wi_0", "wi_1", "wo"], "mt5": ["wi", "wi_0", "wi_1", "wo"],
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
                     "granite", "cohere", "stablelm", "smollm3"], _LLAMA_FFN),
    "phi3": ["gate_up_proj", "down_proj"],
    **dict.fromkeys(["gpt2", "gpt_bigcode", "gpt_neo", "starcoder2"], _GPT2_FFN),
    **dict.fromkeys(["gpt_neox", "bloom"], _NEOX_FFN),
    "gptj": ["fc_in", "fc_out"],
    **dict.fromkeys(["opt", "bart", "mbart", "marian", "pegasus", "phi"], _FC_FFN),
    "distilbert": ["lin1", "lin2"], "albert": ["ffn", "ffn_output"], "modernbert": ["mlp.Wi", "mlp.Wo"],
}


def ffn_target_modules(model: nn.Module) -> list[str] | str:
    """The feed-forward linear layers of `model`'s architecture (MixLoRA's default targets)."""
    return default_targets(model, FFN_TARGET_MODULES, "FFN")


def default_targets(model: nn.Module, table: dict[str, Any], what: str) -> list[str] | str:
    """`table[model_type]`, or a MoreLoraError asking for explicit target_modules (naming the model's linears)."""
    mtype = model_type_of(model)
    if mtype not in table:
        raise no_default_targets(model, what + " ")
    value = table[mtype]
    return value if isinstance(value, str) else list(value)


# --------------------------------------------------------------------------------------------- token routing
def token_router(in_features: int, num_outputs: int, init_std: float | None = None) -> nn.Linear:
    """A bias-free `nn.Linear(in_features -> num_outputs)` router. With `init_std` its weight is then redrawn
    from N(0, init_std) (after nn.Linear's own init: both draw from the random stream); None keeps that init."""
    router = nn.Linear(in_features, num_outputs, bias=False)
    if init_std is not None:
        nn.init.normal_(router.weight, std=init_std)
    return router


def router_softmax(router: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Softmax of `router(x)` over its outputs, (..., num_outputs) in float32 (x cast to the router's dtype)."""
    return router(x.to(router.weight.dtype)).float().softmax(-1)


def route(probs: torch.Tensor, top_k: int | None, normalize: bool = True) -> torch.Tensor:
    """Mixing weights from router probabilities (..., n): all of them, or the top-k (renormalized)."""
    if top_k is None or top_k >= probs.shape[-1]:
        return probs
    vals, idx = probs.topk(top_k, dim=-1)
    if normalize:
        vals = vals / vals.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, vals)


# --------------------------------------------------------------------------------------------- balance losses
def load_balancing_loss(probs: torch.Tensor, top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """n * sum_i f_i P_i from router probabilities (..., n) and the chosen experts (..., k): Switch Transformer's
    load-balancing loss in the top-k form of Mixtral (= k when balanced). f_i = fraction of tokens with expert i
    among their top k, P_i = mean probability of expert i."""
    probs = probs.reshape(-1, num_experts).float()
    chosen = F.one_hot(top_idx.reshape(probs.shape[0], -1), num_experts).sum(1).float()   # (N, n) 0/1
    return num_experts * (chosen.mean(0) * probs.mean(0)).sum()


def top_k_balancing_loss(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """`load_balancing_loss` with each token's top-k experts taken from `probs` (..., n) itself."""
    return load_balancing_loss(probs, probs.topk(top_k, dim=-1).indices, probs.shape[-1])


# --------------------------------------------------------------------------------------------- layers
TOKEN_ROUTED_NOT_MERGEABLE = (
    "{name} routes every token to its own mixture of experts, so the weight change depends on the input token "
    "and no single weight matrix per task exists: it cannot be merged or exported as a LoRA adapter"
)


class TokenRoutedLayer(TaskAdapterLayer):
    """A layer whose change depends on each token (through its `router`): no fixed delta W, no merge or export."""

    method_label: ClassVar[str] = "this method"
    #: appended to the not-mergeable error
    merge_hint: ClassVar[str] = "; run the adapter model itself (model(..., task_ids=...))"
    router: nn.Linear   # set by the subclass, e.g. with `token_router`

    def router_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax router output (..., n experts + null experts, AdaMoE's) in float32."""
        return router_softmax(self.router, x)

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError(TOKEN_ROUTED_NOT_MERGEABLE.format(name=self.method_label) + self.merge_hint)


class LoRAExpertsLinear(TokenRoutedLayer):
    """A frozen `nn.Linear` plus `num_experts` LoRA experts mixed per token by a softmax router.

    `lora_A`: (n, r, d_in), Kaiming-uniform per expert; `lora_B`: (n, d_out, r), zeros; `router`:
    Linear(d_in -> n + num_null_experts), no bias; null experts (AdaMoE) are router outputs without an expert.
    The experts run as one rank-(n r) LoRA whose rank groups are weighted by the router between the two products.
    Subclasses add an auxiliary loss in `set_aux_loss`.
    """

    adapter_param_names = ("lora_A", "lora_B", "router")
    #: compute the auxiliary loss in any training-mode call, not only with autograd on (MixLoRA's layer did)
    aux_loss_without_grad: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: LoRAExpertsConfig,
                 num_experts: int | None = None, num_null_experts: int = 0) -> None:
        super().__init__(base_layer, num_tasks)
        self.cfg = config
        self.num_experts = n = num_experts or config.num_experts
        self.num_null_experts = num_null_experts
        self.r = config.r
        self.top_k = config.top_k
        self.scaling = config.lora_alpha / config.r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = lora_pair(self.in_features, self.out_features, self.r, config.init_lora_weights,
                                             n=n)
        self.router = token_router(self.in_features, n + num_null_experts, config.router_init_std)
        self.to(base_layer.weight.device)

    def expert_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """(..., n) mixing weight of each real expert for each token."""
        return route(probs, self.top_k)[..., : self.num_experts]

    def set_aux_loss(self, probs: torch.Tensor, task_ids: torch.Tensor) -> None:
        """Hook for an auxiliary loss from the router output (training only)."""

    def adapter_forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        probs = self.router_probs(x)
        if self.training and (self.aux_loss_without_grad or torch.is_grad_enabled()):
            self.set_aux_loss(probs, task_ids)
        w = self.expert_weights(probs)                                           # (..., n)
        n, r = self.num_experts, self.r
        z = F.linear(self.lora_dropout(x), self.lora_A.reshape(n * r, -1).to(x.dtype))
        z = z * (w.repeat_interleave(r, dim=-1) * self.scaling).to(z.dtype)
        return F.linear(z, self.lora_B.permute(1, 0, 2).reshape(self.out_features, n * r).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.num_experts}, r={self.r}, top_k={self.top_k}"
