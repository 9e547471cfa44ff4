"""Shared fixtures: tiny random models saved to disk with the bundled MiniLM tokenizer (all offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is fastest, and test subprocesses (resume, 2-process runs) must not oversubscribe
# the cores (several multi-threaded torch processes on 2 cores run ~10x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from morelora.config import bundled_minilm_path

    return AutoTokenizer.from_pretrained(bundled_minilm_path())


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread avoids OpenMP contention on shared CPUs (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    return _minilm_tokenizer()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_tokenizer) -> str:
    """A 2-layer, 32-wide random BERT (with pooler, no dropout) + the MiniLM tokenizer, as a model folder."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # randomness: lora_dropout
    return _save(BertModel(cfg), minilm_tokenizer, tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory, minilm_tokenizer) -> str:
    """A 2-layer random T5 using the MiniLM tokenizer ([PAD] starts decoding, [SEP] ends it)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = minilm_tokenizer
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    return _save(T5ForConditionalGeneration(cfg), tok, tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, minilm_tokenizer) -> str:
    """A 2-layer random LLaMA using the MiniLM tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = minilm_tokenizer
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                      bos_token_id=tok.cls_token_id)
    model = LlamaForCausalLM(cfg)
    model.config.architectures = ["LlamaForCausalLM"]
    return _save(model, tok, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def run_config():
    """Factory: a few-step run config (dict) on three small offline tasks (pair, single, choice)."""
    return tiny_run_config


def tiny_run_config(model_path: str, out: Path, **train: object) -> dict:
    return {
        "model": {"name_or_path": model_path, "max_length": 48},
        "tasks": ["rte", "sst2", "arc_easy"],
        "data": {"max_train_per_task": 32, "max_eval_per_task": 16},
        "method": {"name": "more", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "train": {"output_dir": str(out), "lr": 1e-3, "batch_size": 4, "eval_batch_size": 16, "max_steps": 6,
                  "logging_steps": 2, "save_steps": 3, "save_total_limit": None, **train},
    }
