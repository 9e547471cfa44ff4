"""Configuration of MoRE (Mixture of Low-Rank Experts). Defaults reproduce the paper's method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..base import MoreLoraError, TaskAdapterConfig


@dataclass
class MoREConfig(TaskAdapterConfig):
    """One LoRA module per adapted layer; task t uses the prefix rank k_t that a router picks.

    Every ablation of the paper is a field; `docs/METHOD.md` gives the equations.
    """

    r: int = field(default=8, metadata={"help": "Maximum rank = number of rank experts."})
    lora_alpha: float = field(default=32, metadata={"help": "Scale alpha / r for every expert."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the adapter input."})
    rank_scaling: Literal["linear", "none"] = field(
        default="linear", metadata={"help": "'linear': rank i is scaled by i/r in A and in B; 'none': ablation."})
    routing: Literal["ste", "hard", "frozen"] = field(
        default="ste",
        metadata={"help": "'ste': straight-through argmax (gate and task embeddings learn from the task loss); "
                  "'hard': argmax without gradient (the 'without STE' ablation); 'frozen': the official "
                  "code's defect, ranks fixed at the first forward pass."})
    ste_estimator: Literal["onehot", "prefix_mask"] = field(
        default="onehot",
        metadata={"help": "'onehot': gradient through the chosen expert's probability; 'prefix_mask': the "
                  "mask m_j = sum_{k>=j} w_k, gradient to every expert."})
    expert_structure: Literal["prefix", "subset"] = field(
        default="prefix",
        metadata={"help": "'prefix': expert k = ranks 1..k (nested); 'subset': expert k = a fixed random "
                  "subset of k ranks (the 'arbitrary-subset experts' ablation)."})
    use_task_embeddings: bool = field(
        default=True,
        metadata={"help": "Route through task embeddings E and a gate G; False: a free per-task router "
                  "logit table (the 'without task embeddings' ablation; no contrastive loss)."})
    contrastive_weight: float = field(default=0.1, metadata={"help": "lambda for the contrastive loss."})
    contrastive_temperature: float = field(default=0.05, metadata={"help": "tau of the contrastive loss."})
    contrastive_pooling: Literal["auto", "first", "mean", "last"] = field(
        default="auto",
        metadata={"help": "Which reading of the layer input h the contrastive loss compares with E: 'first': x[:, 0] "
                  "(the paper); 'mean': mean over the attention mask's real tokens; 'last': the last real token; "
                  "'auto': 'first' for encoders and encoder-decoders, 'mean' for decoder-only models (whose first "
                  "position, BOS, sees no text). docs/METHOD.md, 'Contrastive task loss'."})
    task_embedding_std: float = field(default=0.01, metadata={"help": "Init std of task embeddings."})
    init_lora_weights: bool = field(
        default=True, metadata={"help": "B = 0 at init (identity change); False: random B (for tests)."})
    seed: int = field(default=0, metadata={"help": "Seed of the 'subset' expert masks."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise MoreLoraError(f"r must be an integer >= 1, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MoreLoraError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.contrastive_temperature <= 0:
            raise MoreLoraError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")
        if self.contrastive_weight < 0:
            raise MoreLoraError(f"contrastive_weight must be >= 0, got {self.contrastive_weight}")
        for name, allowed in [("rank_scaling", ("linear", "none")), ("routing", ("ste", "hard", "frozen")),
                              ("ste_estimator", ("onehot", "prefix_mask")),
                              ("expert_structure", ("prefix", "subset")),
                              ("contrastive_pooling", ("auto", "first", "mean", "last"))]:
            if getattr(self, name) not in allowed:
                raise MoreLoraError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
