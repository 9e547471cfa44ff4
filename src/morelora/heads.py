"""Encoder backbone + one head per task (BERT-family models with a pooler).

Each head is exactly the classifier of the matching transformers model: ``pooler_output -> dropout ->
Linear``, like ``BertForSequenceClassification`` (``Linear(H, num_labels)``, regression ``Linear(H, 1)``)
and ``BertForMultipleChoice`` (``Linear(H, 1)`` scoring each ``(query, choice)`` sequence), so
:meth:`MultiTaskHeadModel.task_model_spec` can rebuild a standard single-task model from the backbone
and one head. Heads live in ``model.heads[i]`` for task ``i`` of ``specs``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from morelora.data.tasks import TaskSpec

#: Files an export of a task with a non-standard head holds besides the PEFT adapter (see ``save_task_head``).
HEAD_FILE = "task_head.safetensors"
TASK_FILE = "morelora_task.json"


class MultiTaskHeadModel(nn.Module):
    """``backbone`` (an ``AutoModel`` with a pooler) and one head per task of ``specs`` (task id = index).

    ``forward`` takes ``(B, C, L)`` inputs (``(B, L)`` is read as ``C = 1``), flattens them example-major to
    ``(B*C, L)`` for the backbone and returns ``SequenceClassifierOutput(loss, logits)`` with ``(B, K)``
    logits padded with ``-inf`` (``K`` = most classes / choices in the batch). The loss is the mean over
    examples of cross-entropy (classification, multiple choice) or squared error on ``logits[:, 0]``
    (regression), so batches may mix tasks.

    ``pooling="cls"`` (default) feeds BERT's ``pooler_output`` to the heads, exactly as ``BertFor*`` models
    do (so a task exports as a standard transformers model). ``pooling="mean"`` averages the last hidden
    states over the attention mask: the native pooling of sentence-transformers checkpoints such as
    all-MiniLM-L6-v2, which learn much faster from it; such heads cannot be exported as ``BertFor*``.

    ``encoding="siamese"`` (bi-encoder, the way sentence-embedding checkpoints are trained; inputs from
    ``EncoderCollator(siamese=True)``): row 0 of an example is its first text, rows ``1..C`` its second
    texts, each encoded alone to ``u`` and ``v_c``. A head scores ``[u, v, |u - v|, u * v, cos(u, v)]``
    (Sentence-BERT's classifier features plus the cosine; a single text uses ``v = u``). Multiple-choice
    heads start as ``20 * cos(u, v_c)`` (the other weights zero), i.e. at the checkpoint's zero-shot
    similarity ranking. Siamese heads cannot be exported as ``BertFor*`` either.

    ``scorer="shared"``: no head per task. Every task is a choice among texts (the collator casts a
    classification example to a choice among its label words: ``EncoderCollator(as_choices=True)``), scored by
    one scorer for all tasks: siamese, the fixed ``20 * cos(u, v_c)`` (no parameter at all); cross, one trained
    ``Linear(H, 1)`` (``score``) over each ``(query, choice)`` sequence. Whatever specialises per task then lives
    in the adapter alone, as in the paper's text-to-text settings.
    """

    #: Cosine weight a siamese multiple-choice head starts with (sentence-transformers' similarity scale).
    SIAMESE_COS_SCALE = 20.0

    #: module lists with one entry per task (loading a checkpoint with the tasks in another order moves them)
    per_task_modules = ("heads",)

    def __init__(self, backbone: nn.Module, specs: Sequence[TaskSpec], pooling: str = "cls",
                 encoding: str = "cross", scorer: str = "heads", task_prefix: bool = False) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if encoding not in ("cross", "siamese"):
            raise ValueError(f"encoding must be 'cross' or 'siamese', got {encoding!r}")
        if scorer not in ("heads", "shared"):
            raise ValueError(f"scorer must be 'heads' or 'shared', got {scorer!r}")
        self.pooling = pooling
        self.encoding = encoding
        self.scorer = scorer
        self.task_prefix = task_prefix   # the collator's: inputs start with "<task>: " (exports record it)
        self.backbone = backbone
        self.config = backbone.config
        self.specs = list(specs)
        self.task_names = [s.name for s in self.specs]
        dropout = getattr(self.config, "classifier_dropout", None)
        self.dropout = nn.Dropout(dropout if dropout is not None else self.config.hidden_dropout_prob)
        if scorer == "shared":
            from morelora.data.collate import label_texts

            for spec in self.specs:
                if spec.kind != "multiple_choice":
                    label_texts(spec)   # a choice among texts, or a ValueError naming the task
            self.heads = nn.ModuleList()
            # one head for every task (a name in PEFT's modules_to_save: trained and saved); siamese: none
            self.score = nn.Linear(self.config.hidden_size, 1) if encoding == "cross" else None
            if self.score is not None:
                self._init_head(self.score, None)
        else:
            self.heads = nn.ModuleList([self._linear(s) for s in self.specs])
            for spec, head in zip(self.specs, self.heads):
                self._init_head(head, spec)

    def new_head(self, spec: TaskSpec) -> nn.Linear:
        """A freshly initialised head for ``spec`` (e.g. for a task added after training)."""
        head = self._linear(spec)
        self._init_head(head, spec)
        return head

    def _linear(self, spec: TaskSpec) -> nn.Linear:
        hidden = self.config.hidden_size
        return nn.Linear(4 * hidden + 1 if self.encoding == "siamese" else hidden, self._head_size(spec))

    def _init_head(self, head: nn.Linear, spec: TaskSpec | None) -> None:
        """BERT's initialisation of classifier layers; a siamese multiple-choice head starts at the cosine."""
        nn.init.normal_(head.weight, mean=0.0, std=getattr(self.config, "initializer_range", 0.02))
        nn.init.zeros_(head.bias)
        if self.encoding == "siamese" and spec is not None and spec.kind == "multiple_choice":
            with torch.no_grad():
                head.weight.zero_()
                head.weight[:, -1] = self.SIAMESE_COS_SCALE

    @staticmethod
    def _head_size(spec: TaskSpec) -> int:
        if spec.kind == "classification":
            if not spec.num_labels or spec.num_labels < 2:
                raise ValueError(f"task {spec.name!r}: classification needs num_labels >= 2")
            return spec.num_labels
        if spec.kind in ("regression", "multiple_choice"):
            return 1
        raise ValueError(f"task {spec.name!r} of kind {spec.kind!r} has no encoder head")

    def _task_index(self, task: int | str) -> int:
        return self.task_names.index(task) if isinstance(task, str) else int(task)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        choice_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        task_ids: torch.Tensor | Sequence[int | str] | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        if input_ids.dim() == 2:
            input_ids = input_ids[:, None]
            attention_mask = attention_mask[:, None] if attention_mask is not None else None
            token_type_ids = token_type_ids[:, None] if token_type_ids is not None else None
        batch, choices, length = input_ids.shape
        device = input_ids.device
        if task_ids is None:
            if len(self.specs) != 1:
                raise ValueError("task_ids are required with more than one task")
            task_ids = torch.zeros(batch, dtype=torch.long, device=device)
        elif not torch.is_tensor(task_ids):
            task_ids = torch.tensor([self._task_index(t) for t in task_ids], dtype=torch.long, device=device)
        if choice_mask is None:
            choice_mask = torch.ones(batch, choices, dtype=torch.bool, device=device)

        def flat(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.reshape(batch * choices, length)

        out = self.backbone(input_ids=flat(input_ids), attention_mask=flat(attention_mask),
                            token_type_ids=flat(token_type_ids), **kwargs)
        if self.pooling == "mean":
            mask = (flat(attention_mask) if attention_mask is not None else flat(torch.ones_like(input_ids)))
            mask = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            features = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        elif out.pooler_output is None:
            raise ValueError("the backbone returned no pooler_output (load it with add_pooling_layer=True)")
        else:
            features = out.pooler_output
        pooled = self.dropout(features).view(batch, choices, -1)
        if self.scorer == "shared":
            return self._shared_output(pooled, choice_mask, labels, out)
        if self.encoding == "siamese":
            pooled, choices = self._siamese_features(pooled, choice_mask), choices - 1

        present = task_ids.unique().tolist()
        width = max(choices if self.specs[t].kind == "multiple_choice" else self.heads[t].out_features
                    for t in present)
        logits = pooled.new_full((batch, width), float("-inf"))
        for t in present:
            rows = (task_ids == t).nonzero(as_tuple=True)[0]
            if self.specs[t].kind == "multiple_choice":
                scores = self.heads[t](pooled[rows]).squeeze(-1)  # (b, C)
                scores = scores.masked_fill(~choice_mask[rows], float("-inf"))
            else:
                scores = self.heads[t](pooled[rows, 0])  # (b, num_labels)
            logits[rows, : scores.shape[1]] = scores

        loss = None
        if labels is not None:
            per_example = logits.new_zeros(batch, dtype=torch.float32)
            for t in present:
                rows = (task_ids == t).nonzero(as_tuple=True)[0]
                if self.specs[t].kind == "regression":
                    loss_t = F.mse_loss(logits[rows, 0].float(), labels[rows].float(), reduction="none")
                else:
                    loss_t = F.cross_entropy(logits[rows].float(), labels[rows].long(), reduction="none")
                per_example[rows] = loss_t
            loss = per_example.mean()
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)

    def _shared_output(self, pooled: torch.Tensor, choice_mask: torch.Tensor, labels: torch.Tensor | None,
                       out: Any) -> SequenceClassifierOutput:
        """The shared scorer: every example a choice among its rows (``(B, C)`` logits, ``-inf`` where absent)."""
        if self.encoding == "siamese":
            logits = self.SIAMESE_COS_SCALE * F.cosine_similarity(pooled[:, :1], pooled[:, 1:], dim=-1, eps=1e-6)
        else:
            logits = self.score(pooled).squeeze(-1)
        logits = logits.masked_fill(~choice_mask, float("-inf"))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)

    def shared_head(self) -> nn.Linear:
        """The shared scorer as a head over this encoding's features (what ``save_task_head`` writes): cross, the
        trained ``score``; siamese, ``20 * cos(u, v)`` as a ``Linear(4H + 1, 1)`` (weight 20 on the cosine)."""
        if self.score is not None:
            return self.score
        head = nn.Linear(4 * self.config.hidden_size + 1, 1)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.weight[0, -1] = self.SIAMESE_COS_SCALE
        return head

    @staticmethod
    def _siamese_features(pooled: torch.Tensor, second_mask: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + C, H)`` row embeddings -> ``(B, max(C, 1), 4H + 1)`` pair features (``v = u`` if no pair)."""
        u, v = pooled[:, :1], pooled[:, 1:]
        if v.shape[1] == 0:
            v = u
        else:  # examples without a second text (single-sentence tasks in a mixed batch) pair u with itself
            v = torch.where(second_mask.any(1)[:, None, None], v, u)
        u = u.expand_as(v)
        cos = F.cosine_similarity(u, v, dim=-1, eps=1e-6).unsqueeze(-1)
        return torch.cat([u, v, (u - v).abs(), u * v, cos], dim=-1)

    @property
    def standard_heads(self) -> bool:
        """Whether a task maps onto a standard ``BertFor*`` model (cls pooling, cross encoding, a head per task)."""
        return self.pooling == "cls" and self.encoding == "cross" and self.scorer == "heads"

    def save_task_head(self, task: int | str, directory: str | Path) -> Path:
        """Write task ``task``'s head as ``task_head.safetensors`` (``weight``, ``bias``) + ``morelora_task.json``.

        For heads with no standard transformers model (mean pooling, siamese encoding): the exported backbone
        is a plain ``AutoModel``, and the README's "Exported heads" recipe turns its outputs into the logits:
        pool (``pooler_output``, or the masked mean of ``last_hidden_state``), build the features (siamese:
        ``[u, v, |u - v|, u * v, cos(u, v)]`` of the two texts, ``v = u`` for one text), then
        ``features @ weight.T + bias`` (multiple choice: one score per choice).
        """
        from safetensors.torch import save_file

        index = self._task_index(task)
        spec = self.specs[index]
        head = self.shared_head() if self.scorer == "shared" else self.heads[index]
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"weight": head.weight.detach().float().contiguous().cpu(),
                   "bias": head.bias.detach().float().contiguous().cpu()}, str(out / HEAD_FILE))
        words = spec.label_words if spec.kind == "classification" else None
        meta = {"task": spec.name, "kind": spec.kind, "auto_class": "AutoModel", "head_file": HEAD_FILE,
                "pooling": self.pooling, "encoding": self.encoding, "num_labels": head.out_features,
                "id2label": dict(enumerate(words)) if words else None,
                "siamese_features": "[u, v, |u - v|, u * v, cos(u, v)]" if self.encoding == "siamese" else None,
                "task_prefix": f"{spec.name}: " if self.task_prefix else None}
        if self.scorer == "shared":   # every task a choice: classes are scored as their label texts
            from morelora.data.collate import label_texts

            meta.update(scorer="shared", num_labels=spec.num_labels,
                        choices=label_texts(spec) if spec.kind == "classification" else None)
        (out / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out / HEAD_FILE

    def task_model_spec(self, task: int | str) -> dict[str, Any]:
        """How task ``task`` maps onto a standard transformers model.

        Returns ``auto_class`` (``"AutoModelForSequenceClassification"`` / ``"AutoModelForMultipleChoice"``),
        ``config_updates`` for the backbone config, ``prefix`` (the backbone's ``base_model_prefix``: its
        weights go under ``"<prefix>."``) and ``head_state`` (``classifier.weight`` / ``classifier.bias``).
        """
        if not self.standard_heads:
            what = (f"{self.pooling!r} pooling" if self.pooling != "cls" else "siamese encoding"
                    if self.encoding == "siamese" else "the shared scorer")
            raise ValueError(f"heads on {what} have no standard transformers model: use save_task_head, or train "
                             "with model.pooling=cls and model.encoding=cross for a BertFor* model")
        index = self._task_index(task)
        spec, head = self.specs[index], self.heads[index]
        if spec.kind == "multiple_choice":
            auto_class, updates = "AutoModelForMultipleChoice", {}
        elif spec.kind == "regression":
            auto_class = "AutoModelForSequenceClassification"
            updates = {"num_labels": 1, "problem_type": "regression"}
        else:
            words = spec.label_words or [f"LABEL_{i}" for i in range(head.out_features)]
            auto_class = "AutoModelForSequenceClassification"
            updates = {"num_labels": head.out_features, "problem_type": "single_label_classification",
                       "id2label": dict(enumerate(words)), "label2id": {w: i for i, w in enumerate(words)}}
        return {
            "auto_class": auto_class,
            "config_updates": updates,
            "prefix": self.backbone.base_model_prefix,
            "head_state": {"classifier.weight": head.weight.detach().clone(),
                           "classifier.bias": head.bias.detach().clone()},
        }

    def build_task_model(self, task: int | str) -> nn.Module:
        """A standalone transformers model (e.g. ``BertForSequenceClassification``) for one task.

        The backbone must be a plain transformers model here (adapters merged and unloaded).
        """
        import transformers

        spec = self.task_model_spec(task)
        config = copy.deepcopy(self.config)
        for key, value in spec["config_updates"].items():
            setattr(config, key, value)
        model = getattr(transformers, spec["auto_class"]).from_config(config)
        model.get_submodule(spec["prefix"]).load_state_dict(self.backbone.state_dict())
        unexpected = model.load_state_dict(spec["head_state"], strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"{spec['auto_class']} has no parameters {unexpected}")
        return model.to(next(self.backbone.parameters()).device)
