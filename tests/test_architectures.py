"""Every method on every common architecture, from tiny random configs (GPT-2's Conv1D included).

One test per (architecture, method): build with the default targets, a mixed-task training step (loss, gradients,
auxiliary losses), a mixed-task forward equal to each example run alone with its own task, generation with task
ids (causal and seq2seq: the batch equals each row generated alone), save / load (equal outputs), and where the
method is mergeable: merge (equal to the unmerged adapter; unmerge restores the weights bit for bit), export
to PEFT (PEFT's `PeftModel` on a fresh base, and its `merge_and_unload`, equal to the adapter) and our own
`merge_and_unload`.
The README's architecture table is checked against `ARCHITECTURES` and the default-target tables.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as tf
from _tiny import VOCAB, ids, nontrivial_options

import morelora
from morelora import MoreLoraError, build_method
from morelora.tuners.base import EXTRA_LORA_TARGET_MODULES, adaptable_names, adaptable_targets, default_target_modules
from morelora.tuners.common import FFN_TARGET_MODULES, ffn_target_modules
from morelora.tuners.mov import EXTRA_IA3_TARGET_MODULES

TASKS = ["a", "b"]
METHODS = list(morelora.METHODS)
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_DECODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, **_TOKENS}
_ENCODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 64, "num_labels": 3}


@dataclass(frozen=True)
class Arch:
    """A tiny random model of one architecture: `kind` is causal, seq2seq or encoder (sequence classification)."""

    label: str
    kind: str
    build: Callable[[], torch.nn.Module]


def _arch(label: str, kind: str, model_cls: str, config_cls: str, **cfg) -> Arch:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return getattr(tf, model_cls)(getattr(tf, config_cls)(**cfg)).eval()
    return Arch(label, kind, build)


ARCHITECTURES: dict[str, Arch] = {a.label: a for a in [
    _arch("GPT-2", "causal", "GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
          n_positions=64, **_TOKENS),
    _arch("LLaMA", "causal", "LlamaForCausalLM", "LlamaConfig", **_DECODER),
    _arch("Qwen2", "causal", "Qwen2ForCausalLM", "Qwen2Config", **_DECODER),
    _arch("Mistral", "causal", "MistralForCausalLM", "MistralConfig", **_DECODER),
    _arch("Gemma", "causal", "GemmaForCausalLM", "GemmaConfig", head_dim=8, **_DECODER),
    _arch("Gemma2", "causal", "Gemma2ForCausalLM", "Gemma2Config", head_dim=8, **_DECODER),
    _arch("Phi-3", "causal", "Phi3ForCausalLM", "Phi3Config", **_DECODER),
    _arch("GPT-NeoX", "causal", "GPTNeoXForCausalLM", "GPTNeoXConfig", **_DECODER),
    _arch("OPT", "causal", "OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=32, ffn_dim=48,
          num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64, **_TOKENS),
    _arch("BART", "seq2seq", "BartForConditionalGeneration", "BartConfig", vocab_size=VOCAB, d_model=32,
          encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
          encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64),
    _arch("T5", "seq2seq", "T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48,
          num_layers=1, num_decoder_layers=1, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    _arch("BERT", "encoder", "BertForSequenceClassification", "BertConfig", **_ENCODER),
    _arch("RoBERTa", "encoder", "RobertaForSequenceClassification", "RobertaConfig", **_ENCODER),
    _arch("DeBERTa-v2", "encoder", "DebertaV2ForSequenceClassification", "DebertaV2Config", **_ENCODER),
]}

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    x = {"input_ids": ids(2, 6)}
    if kind == "seq2seq":
        x["decoder_input_ids"] = ids(2, 3, seed=5)
    return x


def _labels(kind: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return {"causal": x["input_ids"], "seq2seq": ids(2, 3, seed=4), "encoder": torch.tensor([0, 2])}[kind]


def _row(x: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in x.items()}


def _run(model, x: dict[str, torch.Tensor], **kw) -> torch.Tensor:
    """(batch, features): the logits and the last hidden state (O(1) values, where a classifier's logits are ~0.01)."""
    out = model(**x, output_hidden_states=True, **kw)
    hidden = out.decoder_hidden_states if getattr(out, "decoder_hidden_states", None) else out.hidden_states
    return torch.cat([out.logits.flatten(1), hidden[-1].flatten(1)], 1)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _expected_aux_losses(model) -> set[str]:
    return {name for name, field in type(model).aux_loss_weights.items() if getattr(model.config, field)}


def check_method_on_architecture(arch: Arch, method: str, tmp_path: Path) -> None:
    base = arch.build()
    fresh = copy.deepcopy(base)   # untouched, for loading the saved and exported adapters
    with warnings.catch_warnings(record=True) as caught:   # PEFT warns when a Conv1D gets fan_in_fan_out=False
        warnings.simplefilter("always")
        m = build_method(method, base, TASKS, **nontrivial_options(method))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert m.adapted_names
    x = _inputs(arch.kind)

    # a mixed-task training step: finite loss, gradients reach the adapter, the method's auxiliary losses
    m.train()
    out = m(**x, labels=_labels(arch.kind, x), task_ids=["a", "b"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for _, layer in m.adapter_layers() for n, p in layer.named_parameters()
             if p.requires_grad and not n.startswith("base_layer.")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert set(m.aux_losses) == _expected_aux_losses(m)
    m.on_step_end(1)
    m.zero_grad()
    m.eval()

    # mixed-task forward: each row as if run alone with its own task
    with torch.no_grad():
        mixed = _run(m, x, task_ids=["a", "b"])
        for i, task in enumerate(TASKS):
            _close(mixed[i : i + 1], _run(m, _row(x, i), task_ids=[task]))
        want_b = _run(m, x, task_ids=["b", "b"])
        with m.disable_adapter():     # the adapter changes the output: the comparisons below are not vacuous
            assert (_run(m, x, task_ids=["b", "b"]) - want_b).abs().max() > 1e-3   # 10x the tolerance

    # generate with task ids: the mixed batch equals each row generated alone
    if arch.kind != "encoder":
        gen = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
        batch = m.generate(input_ids=x["input_ids"], task_ids=["a", "b"], **gen)
        assert batch.shape[0] == 2
        for i, task in enumerate(TASKS):
            alone = m.generate(input_ids=x["input_ids"][i : i + 1], task_ids=[task], **gen)
            assert torch.equal(batch[i : i + 1, : alone.shape[1]], alone)

    # save / load on a fresh base
    m.save_pretrained(tmp_path / "adapter")
    loaded = morelora.load_adapter_model(copy.deepcopy(fresh), tmp_path / "adapter").eval()
    with torch.no_grad():
        _close(_run(loaded, x, task_ids=["a", "b"]), mixed)

    if not morelora.get_method(method).mergeable:
        with pytest.raises(NotImplementedError):
            m.merge_task("b")
        return
    # merge / unmerge
    weights = {n: layer.weight.detach().clone() for n, layer in m.adapter_layers()}
    m.merge_task("b")
    with torch.no_grad():
        _close(_run(m, x), want_b)
    m.unmerge()
    assert all(torch.equal(layer.weight, weights[n]) for n, layer in m.adapter_layers())
    # export to PEFT: PeftModel on a fresh base computes task b; so does PEFT's merge_and_unload
    from peft import PeftModel

    m.export_lora("b", tmp_path / "peft")
    with warnings.catch_warnings(record=True) as caught:    # PEFT warns when a Conv1D gets fan_in_fan_out=False
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path / "peft")).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    with torch.no_grad():
        _close(_run(peft_model, x), want_b)
        _close(_run(peft_model.merge_and_unload(), x), want_b)
        plain = m.merge_and_unload("b")      # our own: a plain transformers model with task b merged in
        assert not any(hasattr(mod, "base_layer") for mod in plain.modules())
        _close(_run(plain, x), want_b)


@pytest.mark.parametrize("arch,method", [pytest.param(a, m, id=f"{a}-{m}") for a in ARCHITECTURES for m in METHODS])
def test_method_on_architecture(arch, method, tmp_path):
    """The whole matrix: 14 architectures x 15 methods, ~15 s on one core."""
    check_method_on_architecture(ARCHITECTURES[arch], method, tmp_path)


# --------------------------------------------------------------------------------------------- default targets
#: tiny sizes for any model type built from `AutoConfig.for_model` (each config takes the names it has)
_SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "d_model": 32, "d_kv": 16, "d_ff": 48,
          "num_layers": 2, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
          "decoder_attention_heads": 2, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "ffn_dim": 48,
          "word_embed_proj_dim": 32, "n_embd": 32, "n_layer": 2, "n_head": 2, "dim": 32, "hidden_dim": 48,
          "n_layers": 2, "n_heads": 2, "embedding_size": 32, "max_position_embeddings": 64, **_TOKENS}
_LISTED_TYPES = sorted(set(FFN_TARGET_MODULES) | set(EXTRA_LORA_TARGET_MODULES) | set(EXTRA_IA3_TARGET_MODULES))


def tiny_of_type(model_type: str) -> torch.nn.Module:
    """A tiny random `AutoModel` of `model_type`."""
    cfg = tf.AutoConfig.for_model(model_type)
    for key, value in _SMALL.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    torch.manual_seed(0)
    return tf.AutoModel.from_config(cfg)


def _in_attention(name: str) -> bool:
    return "att" in name.lower()    # attention, attn, self_attn, SelfAttention, EncDecAttention


@pytest.mark.parametrize("model_type", _LISTED_TYPES)
def test_default_targets_exist_in_every_listed_model_type(model_type):
    """Every model type in morelora's tables: each listed name is one of its linear / Conv1D layers; the LoRA-style
    defaults lie in the attention, the FFN defaults outside it (at least two layers per block)."""
    model = tiny_of_type(model_type)
    layers = {n for n, _ in model.named_modules() if adaptable_targets(model, [n])}

    def matched(targets) -> list[str]:
        found = adaptable_targets(model, targets)
        if not isinstance(targets, str):   # every listed name exists (T5 lists wi and the gated wi_0 / wi_1)
            missing = [t for t in targets if not adaptable_targets(model, [t])]
            assert set(missing) <= ({"wi"} if model_type == "mt5" else {"wi_0", "wi_1"} if model_type == "t5"
                                    else set()), (model_type, missing, sorted(layers))
        assert found, (model_type, targets)
        return found

    lora = default_target_modules(model)
    assert lora is not None
    found = matched(lora)
    if model_type in EXTRA_LORA_TARGET_MODULES:
        assert all(_in_attention(n) for n in found), found
    if model_type in FFN_TARGET_MODULES:
        ffn = matched(ffn_target_modules(model))
        assert not any(_in_attention(n) for n in ffn), ffn
        assert len(ffn) >= 2, ffn          # two or three per block (ALBERT shares one block)
    if model_type in EXTRA_IA3_TARGET_MODULES:
        matched(EXTRA_IA3_TARGET_MODULES[model_type])


def test_errors_name_the_models_own_layers():
    opt, gpt2 = ARCHITECTURES["OPT"].build(), ARCHITECTURES["GPT-2"].build()
    with pytest.raises(MoreLoraError) as e:
        build_method("more", opt, TASKS, target_modules=["gate_proj"])
    assert str(e.value) == ("no nn.Linear or Conv1D module matches target_modules=['gate_proj']; linear layer names "
                            "in this model: ['fc1', 'fc2', 'k_proj', 'lm_head', 'out_proj', 'q_proj', 'v_proj']")
    with pytest.raises(MoreLoraError, match=re.escape("in this model: ['c_attn', 'c_fc', 'c_proj', 'lm_head']")):
        build_method("multilora", gpt2, TASKS, target_modules=["q_proj"])
    with pytest.raises(MoreLoraError, match=re.escape("in this model: ['c_attn', 'c_fc', 'c_proj', 'lm_head']")):
        build_method("lora", gpt2, TASKS, target_modules=["q_proj"])
    mixtral = tiny_of_type("mixtral")     # its experts are one fused module, not linear layers: no FFN default
    with pytest.raises(MoreLoraError) as e:
        build_method("mixlora", mixtral, TASKS)
    assert str(e.value) == ("no default FFN target_modules for model type 'mixtral': set target_modules to some of "
                            f"this model's linear layers: {adaptable_names(mixtral)}")
    assert "q_proj" in adaptable_names(mixtral) and "gate_proj" not in adaptable_names(mixtral)
    with pytest.raises(MoreLoraError, match=re.escape("no default target_modules for model type None: set "
                                                      "target_modules to some of this model's linear layers: ['0']")):
        build_method("more", torch.nn.Sequential(torch.nn.Linear(4, 4)), TASKS)


# --------------------------------------------------------------------------------------------- README table
def _names(targets) -> str:
    """Markdown for a target_modules value (a regex's `|` escaped: it would end the table cell)."""
    if isinstance(targets, str):
        return "regex `" + targets.replace("|", "\\|") + "`"
    return ", ".join(f"`{t}`" for t in targets)


def coverage_table() -> str:
    """The README's table: one row per architecture of the matrix above."""
    mergeable = [m for m in METHODS if morelora.get_method(m).mergeable]
    rows = ["| Architecture | model type | adapted layers | default targets | FFN targets (mixlora, loramoe, "
            f"adamoe) | checked for all {len(METHODS)} methods | export to PEFT + merge |",
            "|---|---|---|---|---|---|---|"]
    for label, arch in ARCHITECTURES.items():
        model = arch.build()
        layer = type(model.get_submodule(adaptable_targets(model, default_target_modules(model))[0])).__name__
        checks = "train step, mixed-task forward, save/load" + (", generate" if arch.kind != "encoder" else "")
        rows.append(f"| {label} | `{model.config.model_type}` | {layer} | {_names(default_target_modules(model))} | "
                    f"{_names(ffn_target_modules(model))} | {checks} | ✓ ({len(mergeable)} methods) |")
    return "\n".join(rows)


def test_readme_architecture_table_matches_the_matrix():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert coverage_table() in readme, "README.md's architecture table is stale; replace it with:\n" + coverage_table()


if __name__ == "__main__":      # python tests/test_architectures.py: print the README table
    print(coverage_table())


@pytest.mark.parametrize("label", ["GPT-2", "OPT", "BART", "DeBERTa-v2"])
def test_model_kind_of_a_saved_model(label, tmp_path):
    """`model.kind: auto` reads the saved config: GPT-2's class is GPT2LMHeadModel, not *ForCausalLM."""
    from morelora.config import ModelConfig
    from morelora.training.build import model_kind

    arch = ARCHITECTURES[label]
    arch.build().save_pretrained(tmp_path)
    assert model_kind(ModelConfig(name_or_path=str(tmp_path))) == arch.kind


def test_train_and_reload_a_gpt2_run(tmp_path, minilm_tokenizer, run_config):
    """`morelora train` end to end on GPT-2 (Conv1D targets by default, kind read from GPT2LMHeadModel): the run
    trains, evaluates, and `load_run` rebuilds it with the trained adapter."""
    import json

    from morelora.config import RunConfig
    from morelora.training import load_run, train

    tok = minilm_tokenizer
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2,
                                             n_positions=128, bos_token_id=tok.cls_token_id,
                                             eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    cfg = run_config(str(tmp_path / "gpt2"), tmp_path / "run", max_steps=4, save_steps=0)
    cfg["tasks"] = ["sst2", "arc_easy"]
    cfg["data"]["max_eval_per_task"] = 6
    run_dir = train(RunConfig.from_dict(cfg))
    result = json.loads((run_dir / "eval.json").read_text())
    assert set(result["tasks"]) == {"sst2", "arc_easy"}
    run = load_run(run_dir)
    assert run.kind == "causal"
    adapted = dict(run.model.adapter_layers())
    assert adapted and all(name.endswith("attn.c_attn") for name in adapted)
    assert all(type(layer.base_layer).__name__ == "Conv1D" for layer in adapted.values())
    assert any(layer.lora_B.abs().sum() > 0 for layer in adapted.values())   # trained (B starts at zero)
