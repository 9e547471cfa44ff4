"""A quantised frozen base (QLoRA): the base's linear layers loaded 4-bit / 8-bit by bitsandbytes.

transformers' ``BitsAndBytesConfig`` swaps the base's ``nn.Linear`` layers for bitsandbytes' ``Linear4bit`` /
``Linear8bitLt`` (subclasses of ``nn.Linear`` with a packed ``.weight``); every method then wraps them as it
wraps a float layer: its layers only *call* the base layer, and the adapter keeps its own float32 weights.
PEFT's ``prepare_model_for_kbit_training`` readies the rest of the model (float32 norms / embeddings).
Merging into packed weights is refused (:func:`refuse_quantized_merge`); ``morelora merge`` merges into a
full-precision copy of the base instead.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from typing import Any

import torch
from torch import nn

from morelora.config import ConfigError, QuantizationConfig
from morelora.tuners.base import is_quantized, refuse_quantized_merge

__all__ = ["MIN_BITSANDBYTES", "bnb_config", "check_bitsandbytes", "is_quantized", "prepare_quantized",
           "refuse_quantized_merge"]  # the last two live in tuners.base (layers use them)

MIN_BITSANDBYTES = (0, 47)  # the first release whose CPU backend runs 4-bit and 8-bit layers (x86 AVX2)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bnb_config(q: QuantizationConfig) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization``."""
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=DTYPES[q.compute_dtype])


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_bitsandbytes(bits: int) -> None:
    """ConfigError (one line) unless bitsandbytes >= 0.47 is installed and runs ``bits``-bit layers here."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantization needs bitsandbytes >= 0.47: pip install 'morelora[quant]' "
                          "(or set model.quantization: null)")
    version = importlib.metadata.version("bitsandbytes")
    if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < MIN_BITSANDBYTES:
        raise ConfigError(f"model.quantization needs bitsandbytes >= 0.47 (CPU backend), found {version}: "
                          "pip install -U 'bitsandbytes>=0.47'")
    error = _backend_error(bits, _device_type())
    if error:
        raise ConfigError(f"bitsandbytes {version} cannot run {bits}-bit layers on this machine "
                          f"({_device_type()}: {error}); set model.quantization: null, or use a machine it "
                          "supports (CUDA GPU, or x86 CPU with AVX2)")


@functools.cache
def _backend_error(bits: int, device: str) -> str | None:
    """None when a 64x64 ``bits``-bit layer runs forward and backward on ``device``; else the error, on one line."""
    try:
        import bitsandbytes as bnb

        torch.manual_seed(0)
        dense = nn.Linear(64, 64)
        if bits == 4:
            layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32)
            layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False)
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(dense.weight.data, requires_grad=False, has_fp16_weights=False)
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).float().sum().backward()
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            return "no finite input gradient"
    except Exception as e:  # any failure means: no usable backend
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def prepare_quantized(model: nn.Module, name: str) -> nn.Module:
    """Check that bitsandbytes quantised some layers of ``model`` (loaded from ``name``) and prepare it for
    training with PEFT's ``prepare_model_for_kbit_training`` (frozen base, float32 norms / embeddings)."""
    from peft import prepare_model_for_kbit_training

    packed = [m for m in model.modules() if isinstance(m, nn.Linear) and is_quantized(m)]
    if not packed:
        mtype = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(f"model.quantization: bitsandbytes quantised no layer of {name} (model type {mtype}: "
                          "no nn.Linear layer it can pack); set model.quantization: null")
    for m in packed:
        # bitsandbytes' AVX512-BF16 inference packing needs in_features divisible by the block size (0.50
        # crashes otherwise); such layers take its plain dequantise-and-matmul path instead
        blocksize = getattr(getattr(m.weight, "quant_state", None), "blocksize", None)
        if blocksize and m.in_features % blocksize:
            m.support_avx512bf16_for_cpu = False
    # gradient checkpointing is the trainer's business (a config switch of its own), not a side effect here
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
