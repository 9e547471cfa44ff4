"""Tiny random-weight models of the three architecture families, for fast CPU tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 97


def tiny_bert(num_labels: int = 3, seed: int = 0, hidden: int = 32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2,
                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_llama(seed: int = 0, hidden: int = 32, intermediate: int = 48) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


_RANDOM_INIT = {"mov": {"init_ia3_weights": False, "router_init_std": 1.0},
                "adalora": {"init_lora_weights": False, "lora_dropout": 0.0}}
_TOKEN_ROUTED = ("molora", "loramoe", "mola", "adamoe")


def nontrivial_options(method: str) -> dict:
    """Options giving `method` a non-trivial adapter at init: random B / vectors, sharp routers, no dropout."""
    o = dict(_RANDOM_INIT.get(method, {"init_lora_weights": False, "lora_dropout": 0.0}))
    if method in _TOKEN_ROUTED:
        o["router_init_std"] = 1.0
    return o
