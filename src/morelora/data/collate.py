"""Tokenisation and batch collation.

* :class:`EncoderCollator` — encoder models (BERT family) see every task as scoring ``(B, C, L)``
  sequences: ``C = 1`` for classification / regression ``(text, text_pair)``, one ``(query, choice)``
  sequence per choice for multiple choice, padded to the batch's longest sequence and most choices.
* :class:`Text2TextCollator` — seq2seq (T5) and causal LMs; every task kind is cast to a prompt and a
  target text (:func:`to_text2text`).

Collators take a list of ``(task_index, example)`` pairs, ``task_index`` indexing the ``specs`` list
given at construction, and return ``task_ids`` (B,) along with the tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from morelora.data.tasks import Example, TaskSpec

Feature = tuple[int, Example]
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------ text-to-text casting


def label_word(spec: TaskSpec, label: int) -> str:
    """Target text of class ``label`` (its label word, else the label number)."""
    words = spec.label_words
    return words[label] if words and 0 <= label < len(words) else str(label)


def format_regression_target(value: float) -> str:
    """Regression target as text, rounded to the nearest 0.2 as T5 does for STS-B (``"3.8"``)."""
    return f"{round(value * 5) / 5:.1f}"


def to_text2text(spec: TaskSpec, example: Example, task_prefix: bool = True) -> tuple[str, str]:
    """``(prompt, target)`` texts of any example; the prompt starts with ``"<task>: "`` if ``task_prefix``.

    classification / regression: ``"sentence1: <text> sentence2: <pair>"`` (or just the text) -> label word
    / rounded number; multiple choice: ``"<query> options: A) .. B) .."`` -> gold choice text;
    text-to-text: ``input`` -> ``target``.
    """
    if spec.kind in ("classification", "regression"):
        body = example["text"]
        if example.get("text_pair") is not None:
            body = f"sentence1: {body} sentence2: {example['text_pair']}"
        label = example["label"]
        if spec.kind == "regression":
            target = format_regression_target(label)
        else:
            target = label_word(spec, int(label))
    elif spec.kind == "multiple_choice":
        options = " ".join(f"{chr(ord('A') + i)}) {c}" for i, c in enumerate(example["choices"]))
        body = f"{example['query']} options: {options}"
        target = example["choices"][example["gold"]]
    else:
        body, target = example["input"], example["target"]
    return (f"{spec.name}: {body}" if task_prefix else body), target


def label_texts(spec: TaskSpec) -> list[str]:
    """The texts a task's classes are scored as by the shared scorer: its label words, ``_`` read as a space
    (``not_equivalent`` -> ``not equivalent``); ValueError for a task without them or of another kind."""
    if spec.kind == "multiple_choice":
        raise ValueError(f"task {spec.name!r} is multiple choice: its choices are its texts")
    if spec.kind != "classification":
        raise ValueError(f"task {spec.name!r} is {spec.kind}: the shared scorer (model.scorer: shared) scores "
                         "choices among texts, so it takes classification and multiple-choice tasks only")
    words = spec.label_words or []
    if len(words) != spec.num_labels or len(set(words)) != len(words):
        raise ValueError(f"task {spec.name!r} needs one distinct label word per class for the shared scorer "
                         f"(model.scorer: shared), has {words or 'none'}; give the task label_words")
    return [w.replace("_", " ") for w in words]


# ----------------------------------------------------------------------------------------------- padding


def _pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """Pad token-id lists to the longest into a (N, L) long tensor, on the right or the left."""
    length = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


# ------------------------------------------------------------------------------------------------ encoder


class EncoderCollator:
    """Batches for :class:`morelora.heads.MultiTaskHeadModel`.

    Returns ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the tokenizer makes them) of
    shape ``(B, C, L)``, ``choice_mask`` (B, C) bool, ``labels`` (B,) — long, or float when the batch has a
    regression example — and ``task_ids`` (B,). Missing choices are all padding except that their first
    position is attended (a fully masked row can give NaN attention); the heads mask them with ``-inf``.
    Sequences longer than ``max_length`` are truncated: the query of a multiple-choice pair first
    ("only_first"), the longer of a classification pair first ("longest_first").

    ``siamese=True`` (bi-encoder, for sentence-embedding checkpoints): every text is its own sequence. Row 0
    of an example is its ``text`` / ``query``, rows ``1..C`` its ``text_pair`` / choices, so the shape is
    ``(B, 1 + C, L)`` and ``choice_mask`` ``(B, C)`` marks the second texts present (all False for a
    single-text example). Each text is truncated to ``max_length`` on its own.

    ``as_choices=True`` (the shared scorer, ``model.scorer: shared``): a classification example becomes a choice
    among its task's label words (:func:`label_texts`), its text (and pair, joined by the tokenizer's separator)
    the query, so every task is scored as multiple choice. ``task_prefix=True``: the first text of every example
    starts with ``"<task>: "``.
    """

    def __init__(self, tokenizer: Any, specs: Sequence[TaskSpec], max_length: int = 128,
                 siamese: bool = False, as_choices: bool = False, task_prefix: bool = False) -> None:
        self.tokenizer = tokenizer
        self.specs = list(specs)
        self.max_length = max_length
        self.siamese = siamese
        self.as_choices = as_choices
        self.task_prefix = task_prefix
        for spec in self.specs:
            if spec.kind == "text2text":
                raise ValueError(f"task {spec.name!r} is text2text: use Text2TextCollator")
            if as_choices and spec.kind != "multiple_choice":
                label_texts(spec)   # raises for a task that cannot be a choice among texts
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")

    def _encode(self, firsts: list[str], seconds: list[str] | None, truncation: str) -> list[dict]:
        """Tokenise a group of texts (``seconds=None``) or text pairs; one dict of id lists per item."""
        if seconds is None:
            enc = self.tokenizer(firsts, truncation=True, max_length=self.max_length)
        else:
            try:
                enc = self.tokenizer(firsts, seconds, truncation=truncation, max_length=self.max_length)
            except Exception:  # "only_first" fails when the second text alone is too long
                enc = self.tokenizer(firsts, seconds, truncation="longest_first", max_length=self.max_length)
        return [{k: v[j] for k, v in enc.items()} for j in range(len(firsts))]

    def sequences(self, task_index: int, ex: Example) -> list[tuple[int, str, str | None, str]]:
        """The sequences one example is scored as: ``(row, first text, second text or None, truncation)``."""
        spec = self.specs[task_index]
        kind = spec.kind
        if kind == "multiple_choice":
            first, seconds = ex["query"], list(ex["choices"])
        elif self.as_choices:   # classification as a choice among the label texts
            pair = ex.get("text_pair")
            first = ex["text"] if pair is None else f"{ex['text']} {self.tokenizer.sep_token or chr(10)} {pair}"
            seconds, kind = label_texts(spec), "multiple_choice"
        else:
            pair = ex.get("text_pair")
            first, seconds = ex["text"], [] if pair is None else [pair]
        if self.task_prefix:
            first = f"{spec.name}: {first}"
        if self.siamese:  # row 0: the first text; rows 1..: each second text, alone
            return [(0, first, None, "")] + [(1 + c, t, None, "") for c, t in enumerate(seconds)]
        if kind == "multiple_choice":
            return [(c, first, choice, "only_first") for c, choice in enumerate(seconds)]
        return [(0, first, seconds[0] if seconds else None, "longest_first")]

    def truncates(self, task_index: int, ex: Example) -> bool:
        """Whether any of the example's sequences is longer than ``max_length`` (the collator cuts it)."""
        return any(len(self.tokenizer(a, b)["input_ids"]) > self.max_length
                   for _, a, b, _ in self.sequences(task_index, ex))

    def __call__(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        seqs: list[tuple[int, int, str, str | None, str]] = []  # (example, row, first, second, truncation)
        labels, regression = [], False
        for i, (task_index, ex) in enumerate(features):
            kind = self.specs[task_index].kind
            labels.append(ex["gold"] if kind == "multiple_choice" else ex["label"])
            regression |= kind == "regression"
            seqs += [(i, *row) for row in self.sequences(task_index, ex)]

        groups: dict[tuple[bool, str], list[int]] = {}  # one tokenizer call per (single?, truncation)
        for k, (_, _, _, second, truncation) in enumerate(seqs):
            groups.setdefault((second is None, truncation), []).append(k)
        encoded: list[dict] = [{}] * len(seqs)
        for (single, truncation), idx in groups.items():
            seconds = None if single else [seqs[k][3] for k in idx]
            for k, e in zip(idx, self._encode([seqs[k][2] for k in idx], seconds, truncation)):
                encoded[k] = e

        batch_size, num_rows = len(features), 1 + max(c for _, c, *_ in seqs)
        length = max(len(e["input_ids"]) for e in encoded)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded[0]]
        pad_values = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        shape = (batch_size, num_rows, length)
        batch = {k: torch.full(shape, pad_values[k], dtype=torch.long) for k in keys}
        row_mask = torch.zeros(batch_size, num_rows, dtype=torch.bool)
        for (i, c, *_), e in zip(seqs, encoded):
            for k in keys:
                batch[k][i, c, : len(e[k])] = torch.tensor(e[k], dtype=torch.long)
            row_mask[i, c] = True
        batch["attention_mask"][..., 0] |= ~row_mask  # keep padded rows from being fully masked
        batch["choice_mask"] = row_mask[:, 1:] if self.siamese else row_mask
        batch["labels"] = torch.tensor(labels, dtype=torch.float if regression else torch.long)
        batch["task_ids"] = torch.tensor([t for t, _ in features], dtype=torch.long)
        return batch


# ------------------------------------------------------------------------------------------- text-to-text


class Text2TextCollator:
    """Batches for seq2seq (``causal=False``) or causal (``causal=True``) language models.

    seq2seq: ``input_ids`` / ``attention_mask`` of the prompt, ``labels`` = target ids padded with -100.
    causal: prompt + target + eos concatenated and right-padded; ``labels`` are -100 on the prompt and the
    padding. A causal prompt ends with ``" answer:"`` and gets at most ``max_length - max_target_length - 1``
    tokens, in training and in :meth:`generation_inputs` alike; if longer, its *beginning* is cut (keeping
    the options and the answer cue). Seq2seq prompts are cut at the end by the tokenizer. Targets are cut
    to ``max_target_length`` tokens (causal: plus the eos).

    ``chat`` (causal, ``model.chat_template``): the prompt is one user turn of the tokenizer's chat template with
    its generation prompt (no ``" answer:"``; the template's own special tokens, none added), the target follows.
    """

    def __init__(
        self,
        tokenizer: Any,
        specs: Sequence[TaskSpec],
        max_length: int = 128,
        max_target_length: int = 8,
        causal: bool = False,
        task_prefix: bool = True,
        chat: bool = False,
    ) -> None:
        if chat and not causal:
            raise ValueError("chat templates apply to causal models")
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.chat = chat
        self.specs = list(specs)
        self.max_length = max_length
        self.max_target_length = max_target_length
        self.causal = causal
        self.task_prefix = task_prefix
        eos = tokenizer.eos_token_id
        self.eos_token_id = eos if eos is not None else tokenizer.sep_token_id
        if self.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos (or sep) token")
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        # Causal prompts get the same token budget in training and generation: room for target + eos.
        self._prompt_budget = max_length - (max_target_length + 1 if causal else 0)
        if self._prompt_budget < 1:
            raise ValueError(f"max_length={max_length} leaves no room for a prompt")
        # BPE tokenizers need the space before the answer in the target; SentencePiece ones add it themselves.
        self._target_space = causal and not chat and len(self._ids(" yes")) == len(self._ids("yes"))

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def texts(self, feature: Feature) -> tuple[str, str]:
        """``(prompt, target)`` of one ``(task_index, example)``."""
        task_index, ex = feature
        prompt, target = to_text2text(self.specs[task_index], ex, self.task_prefix)
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True), target
        return (prompt + " answer:", target) if self.causal else (prompt, target)

    def truncates(self, task_index: int, ex: Example) -> bool:
        """Whether the example's prompt is longer than its token budget (the collator cuts it)."""
        prompt, _ = self.texts((task_index, ex))
        return len(self.tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"]) > self._prompt_budget

    def _prompt_ids(self, prompt: str, budget: int) -> list[int]:
        if not self.causal:
            return self.tokenizer(prompt, truncation=True, max_length=budget)["input_ids"]
        # with the model's BOS, if it adds one (a chat template writes its own)
        ids = self.tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"]
        if len(ids) > budget:
            n_bos = 1 if ids and ids[0] == self.tokenizer.bos_token_id else 0
            ids = ids[:n_bos] + ids[len(ids) - budget + n_bos:]
        return ids

    def _target_ids(self, target: str) -> list[int]:
        if not self.causal:
            enc = self.tokenizer(text_target=target, truncation=True, max_length=self.max_target_length)
            return enc["input_ids"]
        ids = self._ids((" " if self._target_space else "") + target)
        return ids[: self.max_target_length] + [self.eos_token_id]

    def __call__(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        task_ids = torch.tensor([t for t, _ in features], dtype=torch.long)
        pairs = [self.texts(f) for f in features]
        targets = [self._target_ids(t) for _, t in pairs]
        if not self.causal:
            prompts = [self._prompt_ids(p, self.max_length) for p, _ in pairs]
            return {
                "input_ids": _pad(prompts, self.pad_token_id),
                "attention_mask": _pad([[1] * len(p) for p in prompts], 0),
                "labels": _pad(targets, IGNORE_INDEX),
                "task_ids": task_ids,
            }
        seqs, labels = [], []
        for (prompt, _), target in zip(pairs, targets):
            prompt_ids = self._prompt_ids(prompt, self._prompt_budget)
            seqs.append(prompt_ids + target)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + target)
        return {
            "input_ids": _pad(seqs, self.pad_token_id),
            "attention_mask": _pad([[1] * len(s) for s in seqs], 0),
            "labels": _pad(labels, IGNORE_INDEX),
            "task_ids": task_ids,
        }

    def generation_inputs(self, features: Sequence[Feature]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Prompts for ``generate`` (left-padded for causal LMs) and the reference target texts."""
        pairs = [self.texts(f) for f in features]
        prompts = [self._prompt_ids(p, self._prompt_budget) for p, _ in pairs]
        batch = {
            "input_ids": _pad(prompts, self.pad_token_id, left=self.causal),
            "attention_mask": _pad([[1] * len(p) for p in prompts], 0, left=self.causal),
            "task_ids": torch.tensor([t for t, _ in features], dtype=torch.long),
        }
        return batch, [t for _, t in pairs]
