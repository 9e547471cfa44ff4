"""MixLoRA baseline (Li et al., 2024): top-k token-routed LoRA experts on the FFN.

For a frozen linear layer W0 (d_out x d_in), n experts of rank r, top-k routing:

    A (n x r x d_in, Kaiming-uniform per expert)  B (n x d_out x r, zeros)  router W_r: Linear(d_in -> n, no bias)
    p(x) = softmax(W_r x)          (per token; the router sees the layer input before dropout)
    w(x) = p(x) on its k largest entries, renormalised to sum 1, zero elsewhere
    delta(x) = (alpha / r) * sum_i w_i(x) B_i A_i dropout(x)

Load balancing (Switch Transformer, in the top-k form of Mixtral that MixLoRA's code uses), over the
N tokens of the layer's batch (padding included: the layer does not see the attention mask):

    f_i = (# tokens with expert i among their top k) / N,   P_i = mean over tokens of p_i(x)
    L_balance = n * sum_i f_i P_i        (= k at perfect balance; Switch's loss for k = 1)

reported as aux loss "balance" (mean over layers, training only), weighted by `balance_weight`.

Cost: every token runs all n experts densely (one matmul through the n*r stacked ranks, experts outside
the top k weighted 0), i.e. the cost of one rank n*r LoRA per token, with no Python loop over experts.
Differences from MixLoRA: each adapted linear layer has its own router (MixLoRA shares one router per
FFN block across its linear layers); attention LoRAs are not added here (select them with target_modules).

Token routing makes the change depend on each token, so no single weight matrix per task exists:
MixLoRA cannot be merged or exported as a plain LoRA adapter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import MoreLoraError, TaskAdapterLayer, TaskAdapterModel, lora_pair, model_type_of
from .lora import LowRankConfig, check_int
from .routing import router_softmax, token_router

_BERT_FFN = r"(.*\.)?layer\.\d+\.(intermediate|output)\.dense"   # not attention.output.dense
_LLAMA_FFN = ["gate_proj", "up_proj", "down_proj"]
#: model type -> the FFN linear layers (names as target_modules takes them)
FFN_TARGET_MODULES: dict[str, list[str] | str] = {
    "bert": _BERT_FFN, "roberta": _BERT_FFN, "xlm-roberta": _BERT_FFN, "electra": _BERT_FFN,
    "t5": ["wi", "wi_0", "wi_1", "wo"], "mt5": ["wi", "wi_0", "wi_1", "wo"],
    "llama": _LLAMA_FFN, "mistral": _LLAMA_FFN, "qwen2": _LLAMA_FFN, "qwen3": _LLAMA_FFN, "gemma": _LLAMA_FFN,
}

TOKEN_ROUTED_NOT_MERGEABLE = (
    "{name} routes every token to its own mixture of experts, so the weight change depends on the input token "
    "and no single weight matrix per task exists: it cannot be merged or exported as a LoRA adapter"
)


def ffn_target_modules(model: nn.Module) -> list[str] | str:
    """The feed-forward linear layers of `model`'s architecture (MixLoRA's default targets)."""
    mtype = model_type_of(model)
    if mtype not in FFN_TARGET_MODULES:
        raise MoreLoraError(f"no default FFN target_modules for model type {mtype!r}: set target_modules, e.g. "
                            "['gate_proj', 'up_proj', 'down_proj']")
    return FFN_TARGET_MODULES[mtype]


def load_balancing_loss(probs: torch.Tensor, top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """n * sum_i f_i P_i from router probabilities (..., n) and the chosen experts (..., k)."""
    probs = probs.reshape(-1, num_experts).float()
    chosen = F.one_hot(top_idx.reshape(probs.shape[0], -1), num_experts).sum(1).float()   # (N, n) 0/1
    return num_experts * (chosen.mean(0) * probs.mean(0)).sum()


@dataclass
class MixLoRAConfig(LowRankConfig):
    """n LoRA experts of rank r per FFN linear layer, top-k routed per token, with a balancing loss."""

    num_experts: int = field(default=8, metadata={"help": "Number of LoRA experts per adapted layer."})
    top_k: int = field(default=2, metadata={"help": "Experts used by each token."})
    balance_weight: float = field(default=0.01, metadata={"help": "Weight of the load-balancing loss."})
    router_init_std: float = field(default=0.02, metadata={"help": "Init std of the router weights."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_experts", self.num_experts)
        check_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise MoreLoraError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.balance_weight < 0:
            raise MoreLoraError(f"balance_weight must be >= 0, got {self.balance_weight}")
        if self.router_init_std < 0:
            raise MoreLoraError(f"router_init_std must be >= 0, got {self.router_init_std}")


class MixLoRALinear(TaskAdapterLayer):
    """A frozen `nn.Linear` plus n LoRA experts, top-k routed per token."""

    adapter_param_names = ("lora_A", "lora_B", "router")

    def __init__(self, base_layer: nn.Linear, num_tasks: int, config: MixLoRAConfig) -> None:
        super().__init__(base_layer, num_tasks)
        n, r = config.num_experts, config.r
        self.r, self.num_experts, self.top_k = r, n, config.top_k
        self.cfg = config
        self.scaling = config.lora_alpha / r
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = lora_pair(self.in_features, self.out_features, r, config.init_lora_weights, n=n)
        self.router = token_router(self.in_features, n, config.router_init_std)
        self.to(base_layer.weight.device)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w: (..., n) top-k renormalised weights, p: (..., n) softmax, idx: (..., k) chosen experts)."""
        probs = router_softmax(self.router, x)
        top_p, top_idx = probs.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, top_idx, top_p / top_p.sum(-1, keepdim=True))
        return weights, probs, top_idx

    def adapter_forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        weights, probs, top_idx = self.route(x)
        n, r = self.num_experts, self.r
        z = F.linear(self.lora_dropout(x), self.lora_A.reshape(n * r, self.in_features).to(x.dtype))  # (..., n*r)
        z = (z.unflatten(-1, (n, r)) * (weights * self.scaling).to(z.dtype)[..., None]).flatten(-2)
        if self.training:
            self.aux_loss = load_balancing_loss(probs, top_idx, n)
        return F.linear(z, self.lora_B.permute(1, 0, 2).reshape(self.out_features, n * r).to(x.dtype))

    def lora_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError(TOKEN_ROUTED_NOT_MERGEABLE.format(name="MixLoRA"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, experts={self.num_experts}, top_k={self.top_k}"


class MixLoRAModel(TaskAdapterModel):
    """A frozen model with token-routed LoRA experts on its FFN layers (default targets)."""

    method_name = "mixlora"
    config_class = MixLoRAConfig
    layer_class = MixLoRALinear
    aux_loss_weights = {"balance": "balance_weight"}

    def __init__(self, model: nn.Module, config: MixLoRAConfig) -> None:
        if config.target_modules is None:
            config = dataclasses.replace(config, target_modules=ffn_target_modules(model))
        super().__init__(model, config)

    def make_layer(self, name: str, base: nn.Linear) -> MixLoRALinear:
        return MixLoRALinear(base, len(self.config.tasks), self.config)
