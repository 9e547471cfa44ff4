"""MoREModel: inject MoRE layers into a frozen transformers model (PEFT-style API).

Batched routing (training): a layer's router is a handful of tiny ops (gate, softmax, argmax, STE, scale, index by
task) and the contrastive loss another handful; run per layer they cost more than the layer's matmuls on small
models (docs/BENCHMARKS.md, "Why the hot path looks as it does"). So before the base forward the model groups its
layers by `(in_features, r)` and computes every group's coefficients in one `baddbmm` + softmax + argmax + STE — for the
batch's B task rows when B < T (so the cost follows the batch, not the number of tasks), else as an `(L, T, r)`
table indexed once with the task ids — and hands each layer its `(B, r)` rows through the call's state
(`MoRECall.routed`). Layers leave their pooled input there instead of computing the contrastive loss, and the model
computes it per group after the forward with one `bmm`. Both are layer.py's functions (`rank_coefficients`,
`contrastive_logits`) applied to L layers at once, so values and gradients are those of the per-layer path (up to
float rounding: the gate as one `baddbmm`). Routing stays per layer, exactly as before, at inference (eval mode or
no grad: the layers' cached tables), for `routing` "hard"/"frozen", `ste_estimator="prefix_mask"`,
`expert_structure="subset"`, `use_task_embeddings=False`, and in a layer called with task ids other than the model's
(that layer also computes its own contrastive loss), and while any router parameter is sharded (FSDP: outside its
unit's forward it is a DTensor / flat shard, so routing and the contrastive loss happen inside each layer's forward,
where FSDP has gathered it); the contrastive loss of the other layers is batched whatever the routing. One
difference: an adapted layer that does not run in a training forward gets zero (not None) gradients for its router,
since its group's table was built. `_grouped_routing = False` turns all of this off (the reference path of the
tests).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import CheckpointError, TaskAdapterModel, read_adapter_config
from .config import MoREConfig
from .layer import MoRECall, MoRELinear, contrastive_logits, rank_coefficients

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # a build without torch.distributed: nothing can be sharded
    DTensor = None

#: attention modules of encoder-decoder models whose key / value projections read the encoder's states
_CROSS_ATTENTION = ("EncDecAttention", "encoder_attn", "crossattention")


def is_decoder_only(model: nn.Module) -> bool:
    """A decoder-only transformers model (causal attention everywhere: position 0 sees only itself)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    mtype = getattr(cfg, "model_type", None)
    # BERT-like types also have a causal-LM class (as decoders); they count as encoders unless configured as one
    return bool(getattr(cfg, "is_decoder", False)) or (
        mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mtype not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def reads_decoder_states(name: str) -> bool:
    """In an encoder-decoder model: does the adapted linear `name` read the decoder's token positions (its
    self-attention, the queries of its cross-attention, its FFN) rather than the encoder's?"""
    parts = name.split(".")
    if "decoder" not in parts:
        return False
    cross_kv = any(p in _CROSS_ATTENTION for p in parts) and parts[-1] in ("k", "v", "k_proj", "v_proj", "key", "value")
    return not cross_kv


class MoREModel(TaskAdapterModel):
    """A frozen model with one MoRE module per target linear layer.

    >>> model = get_more_model(hf_model, MoREConfig(tasks=["sst2", "rte"]))
    >>> out = model(**batch, task_ids=["sst2", "rte"])       # per-example tasks, mixed batches allowed
    >>> out.loss            # task loss + contrastive_weight * model.aux_losses["contrastive"]
    """

    method_name = "more"
    config_class = MoREConfig
    layer_class = MoRELinear
    aux_loss_weights = {"contrastive": "contrastive_weight"}
    #: False: every layer routes itself and computes its own contrastive loss (the reference path, for tests).
    _grouped_routing = True

    def make_layer(self, name: str, base: nn.Linear) -> MoRELinear:
        layer = MoRELinear(base, len(self.config.tasks), self.config)
        layer.contrastive_pooling = self.contrastive_pooling
        return layer

    @property
    def contrastive_pooling(self) -> str:
        """The contrastive loss's reading of the layer inputs: the config's, or for "auto" the model kind's
        ("mean" for decoder-only models, "first" otherwise); a loaded checkpoint may pin it (`load_adapter`)."""
        if "_pooling" not in self.__dict__:
            p = self.config.contrastive_pooling
            self.__dict__["_pooling"] = p if p != "auto" else ("mean" if is_decoder_only(self.base_model) else "first")
        return self.__dict__["_pooling"]

    def _set_contrastive_pooling(self, pooling: str) -> None:
        self.__dict__["_pooling"] = pooling
        for _, layer in self.adapter_layers():
            layer.contrastive_pooling = pooling

    def task_ranks(self) -> dict[str, dict[str, int]]:
        """{task: {module name: rank k_t}}: the prefix rank each task uses in each layer."""
        per_layer = {name: layer.task_ranks() for name, layer in self.adapter_layers()}
        return {task: {name: ranks[t] for name, ranks in per_layer.items()} for t, task in enumerate(self.tasks)}

    def routing_state(self) -> dict[str, dict[str, int]]:
        """The router's choices: `task_ranks()`."""
        return self.task_ranks()

    def after_weights_changed(self) -> None:
        for _, layer in self.adapter_layers():
            layer.clear_cache()

    def _extra_metadata(self) -> dict[str, Any]:
        return {"task_ranks": self.task_ranks(), "contrastive_pooling": self.contrastive_pooling}

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load adapter weights; with `contrastive_pooling: auto`, also the pooling the checkpoint was trained with
        (a checkpoint from before the option: "first"), so that a resumed run keeps its training objective."""
        super().load_adapter(directory)
        if self.config.contrastive_pooling != "auto":
            return
        saved = read_adapter_config(directory).get("contrastive_pooling", "first")
        if saved not in ("first", "mean", "last"):
            raise CheckpointError(f"{directory}: unknown contrastive_pooling {saved!r} in its adapter config "
                                  "(expected first, mean or last); re-save the adapter")
        self._set_contrastive_pooling(saved)

    def _layer_masks(self, kwargs: dict[str, Any]) -> list[tuple[MoRELinear, torch.Tensor | None]]:
        """Each layer with the attention mask of its input positions, flattened to (rows, tokens): the decoder's
        (`decoder_attention_mask`) for the decoder side of an encoder-decoder model, else `attention_mask`."""
        enc, dec = kwargs.get("attention_mask"), kwargs.get("decoder_attention_mask")
        enc = enc.reshape(-1, enc.shape[-1]) if enc is not None else None   # (B, C, L) choices -> (B * C, L)
        dec = dec.reshape(-1, dec.shape[-1]) if dec is not None else None
        if not getattr(getattr(self.base_model, "config", None), "is_encoder_decoder", False):
            return [(layer, enc) for _, layer in self.adapter_layers()]
        return [(layer, dec if reads_decoder_states(name) else enc) for name, layer in self.adapter_layers()]

    # ------------------------------------------------------------------ batched routing (training)
    def _layer_groups(self) -> list[list[MoRELinear]]:
        """Adapter layers grouped by (in_features, r), in model order; rebuilt when the layer list changes."""
        cache = self.__dict__.get("_group_cache")
        if cache is None or cache[0] is not self.adapted_names:
            groups: dict[tuple[int, int], list[MoRELinear]] = {}
            for _, layer in self.adapter_layers():
                groups.setdefault((layer.in_features, layer.r), []).append(layer)
            cache = (self.adapted_names, list(groups.values()))
            self.__dict__["_group_cache"] = cache
        return cache[1]

    def _routers_whole(self) -> bool:
        """False while some layer's router parameters are sharded: under FSDP2 (`fully_shard`) they are DTensors
        outside their unit's forward, under FSDP1 (`use_orig_params=True`) flat 1-D shards; only the layer
        itself, inside that forward, sees them whole."""
        if not self.config.use_task_embeddings:
            return True
        for _, layer in self.adapter_layers():
            e = layer._parameters["task_embedding"]
            gate = layer._modules["gate"]._parameters
            w, b = gate["weight"], gate["bias"]
            if e.dim() != 2 or e.shape[0] != layer.num_tasks or w.shape != (layer.r, layer.in_features) \
                    or b is None or b.shape != (layer.r,) or (DTensor is not None and isinstance(e, DTensor)):
                return False
        return True

    def _batched_routing_applies(self) -> bool:
        cfg = self.config
        return (self.training and cfg.use_task_embeddings and cfg.routing == "ste"
                and cfg.ste_estimator == "onehot" and cfg.expert_structure == "prefix" and torch.is_grad_enabled())

    @staticmethod
    def _route_group(layers: list[MoRELinear], ids: torch.Tensor, routed: dict[MoRELinear, torch.Tensor]
                     ) -> torch.Tensor | None:
        """Put every layer of `layers`'s (B, r) STE coefficients into `routed`; returns the stacked E (L, T, d_in)."""
        first = layers[0]
        if not all(layer.training for layer in layers) or first.merged_task is not None:
            return None
        es = [layer._parameters["task_embedding"] for layer in layers]
        ws = [layer.gate._parameters["weight"] for layer in layers]
        bs = [layer.gate._parameters["bias"] for layer in layers]
        if any(b is None for b in bs) or len({(e.device, e.dtype, w.device, w.dtype) for e, w in zip(es, ws)}) > 1:
            return None   # mixed devices / dtypes (e.g. a model split over GPUs): per layer
        E, W, b = torch.stack(es), torch.stack(ws), torch.stack(bs)               # (L,T,d) (L,r,d) (L,r)
        # rows: the batch's task embeddings when it has fewer examples than there are tasks (the cost then
        # follows the batch, not the number of tasks), else every task's, indexed after; same values
        per_example = ids.shape[0] < E.shape[1]
        rows = E[:, ids] if per_example else E
        # = layer.router_probs(): softmax(gate(E.to(gate dtype))) in float32
        p = torch.baddbmm(b.unsqueeze(1), rows.to(W.dtype), W.transpose(1, 2)).float().softmax(-1)  # (L,rows,r)
        coef = rank_coefficients(p, first.expert_mask, first.coef_scale, "onehot")                     # (L,rows,r)
        for layer, c in zip(layers, (coef if per_example else coef[:, ids]).unbind(0)):   # one index per group
            routed[layer] = c
        return E

    def _new_call_state(self, task_ids: torch.Tensor | None, inputs: dict[str, Any] | None = None) -> MoRECall:
        """A training forward's state: the attention masks the contrastive loss pools with ("mean" / "last": from
        the keyword arguments `attention_mask` / `decoder_attention_mask`; without them it pools over every
        position), the routing of every layer group, and the contrastive loss deferred to the model."""
        call = MoRECall(task_ids)
        if inputs is None or not self.training:
            return call
        cfg = self.config
        contrastive = cfg.use_task_embeddings and cfg.contrastive_weight > 0
        if contrastive and torch.is_grad_enabled() and self.contrastive_pooling != "first":
            call.masks = dict(self._layer_masks(inputs))
        # sharded routers (FSDP2): the per-layer path, which routes and computes the contrastive loss inside
        # each layer's forward, where FSDP has gathered its parameters
        if task_ids is not None and self._grouped_routing and self._routers_whole():
            if self._batched_routing_applies():
                call.stacked_e = {i: E for i, layers in enumerate(self._layer_groups())
                                  if (E := self._route_group(layers, task_ids, call.routed)) is not None}
            call.defer_contrastive = contrastive
        return call

    def _collect_aux_losses(self, call: MoRECall) -> dict[str, torch.Tensor]:
        """Mean over layers of the contrastive loss: deferred layers per group, the others' own `aux_loss`."""
        stored = []
        if call.pooled:
            for i, layers in enumerate(self._layer_groups()):
                entries = [(j, call.pooled[layer]) for j, layer in enumerate(layers) if layer in call.pooled]
                if entries:
                    stored.append((layers, entries, call.stacked_e.get(i)))
            call.pooled.clear()
        values = []
        for _, layer in self.adapter_layers():
            if layer.aux_loss is not None:
                values.append(layer.aux_loss)
                layer.aux_loss = None
        if not stored:
            return {"contrastive": torch.stack(values).mean()} if values else {}
        total = sum(self._group_contrastive(*entry) for entry in stored)
        count = sum(len(entries) for _, entries, _ in stored) + len(values)
        if values:
            total = total + torch.stack(values).sum()
        return {"contrastive": total / count}

    def _group_contrastive(self, layers: list[MoRELinear], stored: list[tuple[int, Any]],
                           E: torch.Tensor | None) -> torch.Tensor:
        """Sum over the stored layers of a group (index j, (h, task ids)) of their contrastive loss."""
        buckets: dict[int, list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
        for j, entry in stored:   # layers that saw the same number of rows (B, or B * m for choices)
            buckets.setdefault(entry[0].shape[0], []).append((j, entry))
        total = None
        for rows, entries in buckets.items():
            h = torch.stack([h for _, (h, _) in entries])                                    # (L, rows, d)
            if E is not None and len(entries) == len(layers):
                e = E
            else:
                e = torch.stack([layers[j]._parameters["task_embedding"] for j, _ in entries])
            logits = contrastive_logits(h, e, self.config.contrastive_temperature)              # (L, rows, T)
            ids = entries[0][1][1]
            part = F.cross_entropy(logits.flatten(0, 1), ids.repeat(len(entries)), reduction="sum") / rows
            total = part if total is None else total + part
        return total


def get_more_model(model: nn.Module, config: MoREConfig) -> MoREModel:
    """Wrap `model` (frozen) with MoRE adapters as `config` says: PEFT's `get_peft_model` for MoRE."""
    return MoREModel(model, config)
