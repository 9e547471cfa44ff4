"""MultiTaskHeadModel against the standard BertForSequenceClassification / BertForMultipleChoice."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMultipleChoice, BertForSequenceClassification, BertModel

from morelora.data import TaskSpec
from morelora.heads import MultiTaskHeadModel

SPECS = [
    TaskSpec("cls3", "classification", ["accuracy"], num_labels=3, label_words=["a", "b", "c"]),
    TaskSpec("mc", "multiple_choice", ["accuracy"], num_labels=4),
    TaskSpec("reg", "regression", ["pearson"], num_labels=1),
]
VOCAB = 99


def _config(**kw) -> BertConfig:
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                      vocab_size=VOCAB, max_position_embeddings=64, **kw)


@pytest.fixture(scope="module")
def model() -> MultiTaskHeadModel:
    torch.manual_seed(0)
    m = MultiTaskHeadModel(BertModel(_config()), SPECS)
    for head in m.heads:  # non-trivial biases so a missing bias shows
        torch.nn.init.normal_(head.bias, std=0.5)
    return m.eval()


def _inputs(batch: int, choices: int, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, choices, length), generator=g)
    mask = torch.ones_like(ids)
    mask[..., length - 3:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _reference(model: MultiTaskHeadModel, task: int):
    spec = model.task_model_spec(task)
    config = _config()
    for key, value in spec["config_updates"].items():
        setattr(config, key, value)
    is_mc = spec["auto_class"] == "AutoModelForMultipleChoice"
    cls = BertForMultipleChoice if is_mc else BertForSequenceClassification
    ref = cls(config).eval()
    assert spec["prefix"] == "bert"
    ref.bert.load_state_dict(model.backbone.state_dict())
    ref.classifier.load_state_dict({k.split(".", 1)[1]: v for k, v in spec["head_state"].items()})
    return ref, spec


def test_classification_matches_bert_for_sequence_classification(model):
    ref, spec = _reference(model, "cls3")
    assert spec["auto_class"] == "AutoModelForSequenceClassification"
    assert spec["config_updates"]["num_labels"] == 3 and spec["config_updates"]["id2label"][2] == "c"
    x = _inputs(5, 1)
    labels = torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        out = model(**x, labels=labels, task_ids=torch.zeros(5, dtype=torch.long))
        expected = ref(**{k: v[:, 0] for k, v in x.items()}, labels=labels)
    assert out.logits.shape == (5, 3)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=0)
    with torch.no_grad():  # (B, L) inputs are read as C = 1
        flat = model(**{k: v[:, 0] for k, v in x.items()}, task_ids=["cls3"] * 5)
    torch.testing.assert_close(flat.logits, expected.logits, atol=1e-5, rtol=0)


def test_multiple_choice_matches_bert_for_multiple_choice(model):
    ref, spec = _reference(model, 1)
    assert spec["auto_class"] == "AutoModelForMultipleChoice" and spec["config_updates"] == {}
    x = _inputs(3, 4, seed=1)
    labels = torch.tensor([3, 0, 1])
    with torch.no_grad():
        out = model(**x, choice_mask=torch.ones(3, 4, dtype=torch.bool), labels=labels,
                    task_ids=torch.ones(3, dtype=torch.long))
        expected = ref(**x, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=0)


def test_regression_matches_and_build_task_model(model):
    ref, spec = _reference(model, "reg")
    assert spec["config_updates"] == {"num_labels": 1, "problem_type": "regression"}
    x = _inputs(4, 1, seed=2)
    labels = torch.tensor([0.5, -1.0, 2.0, 0.0])
    with torch.no_grad():
        out = model(**x, labels=labels, task_ids=torch.full((4,), 2))
        expected = ref(**{k: v[:, 0] for k, v in x.items()}, labels=labels)
        built = model.build_task_model("reg").eval()(**{k: v[:, 0] for k, v in x.items()})
    assert out.logits.shape == (4, 1)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=0)
    assert isinstance(model.build_task_model("reg"), BertForSequenceClassification)
    torch.testing.assert_close(built.logits, expected.logits, atol=1e-5, rtol=0)
    assert isinstance(model.build_task_model("mc"), BertForMultipleChoice)


def test_mixed_batch_logits_padding_and_loss(model):
    """A batch mixing all three tasks equals the single-task reference models row by row."""
    x = _inputs(4, 3, seed=3)
    task_ids = torch.tensor([1, 0, 2, 1])
    choice_mask = torch.tensor([[True, True, True], [True, False, False], [True, False, False],
                                [True, True, False]])
    labels = torch.tensor([2.0, 1.0, 0.7, 1.0])
    with torch.no_grad():
        out = model(**x, choice_mask=choice_mask, labels=labels, task_ids=task_ids)
    assert out.logits.shape == (4, 3)
    refs = {t: _reference(model, t)[0] for t in range(3)}
    losses = []
    with torch.no_grad():
        mc0 = refs[1](**{k: v[0:1] for k, v in x.items()}).logits[0]
        mc3 = refs[1](**{k: v[3:4, :2] for k, v in x.items()}).logits[0]
        cls = refs[0](**{k: v[1:2, 0] for k, v in x.items()}).logits[0]
        reg = refs[2](**{k: v[2:3, 0] for k, v in x.items()}).logits[0]
    torch.testing.assert_close(out.logits[0], mc0, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[1], cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[2, :1], reg, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[3, :2], mc3, atol=1e-5, rtol=0)
    assert torch.isinf(out.logits[2, 1:]).all() and torch.isinf(out.logits[3, 2]) and out.logits[3, 2] < 0
    losses = [F.cross_entropy(mc0[None], torch.tensor([2])), F.cross_entropy(cls[None], torch.tensor([1])),
              (reg[0] - 0.7) ** 2, F.cross_entropy(mc3[None], torch.tensor([1]))]
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), atol=1e-5, rtol=0)


def test_gradients_finite_with_padded_choices(model):
    model.train()
    try:
        x = _inputs(2, 4, seed=4)
        x["attention_mask"][0, 2:] = 0
        x["attention_mask"][0, 2:, 0] = 1  # as EncoderCollator pads missing choices
        choice_mask = torch.tensor([[True, True, False, False], [True] * 4])
        out = model(**x, choice_mask=choice_mask, labels=torch.tensor([1, 3]), task_ids=torch.tensor([1, 1]))
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert model.heads[1].weight.grad.abs().sum() > 0 and model.heads[0].weight.grad is None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_dropout_signature_and_errors():
    m = MultiTaskHeadModel(BertModel(_config(hidden_dropout_prob=0.3)), SPECS[:1])
    assert m.dropout.p == 0.3
    m2 = MultiTaskHeadModel(BertModel(_config(classifier_dropout=0.05)), SPECS[:1])
    assert m2.dropout.p == 0.05
    assert "task_ids" in inspect.signature(m.forward).parameters
    out = m.eval()(**_inputs(2, 1))  # a single task needs no task_ids
    assert out.logits.shape == (2, 3)
    with pytest.raises(ValueError, match="no encoder head"):
        MultiTaskHeadModel(BertModel(_config()), [TaskSpec("t", "text2text", [])])


# ------------------------------------------------------------------------------------------ siamese


def _mean_pool(backbone, ids, mask):
    h = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


def test_siamese_heads_match_hand_computed_features():
    torch.manual_seed(0)
    specs = [*SPECS, TaskSpec("single", "classification", ["accuracy"], num_labels=2)]
    model = MultiTaskHeadModel(BertModel(_config()), specs, pooling="mean", encoding="siamese").eval()
    hidden = model.config.hidden_size
    assert all(h.in_features == 4 * hidden + 1 for h in model.heads)
    mc_head = model.heads[1]  # starts as 20 * cosine, everything else zero
    assert mc_head.weight[0, -1] == 20.0 and mc_head.weight[0, :-1].abs().sum() == 0 and mc_head.bias.item() == 0
    for head in model.heads:
        torch.nn.init.normal_(head.weight, std=0.1)
        torch.nn.init.normal_(head.bias, std=0.5)
    x = _inputs(4, 4, seed=3)  # rows: first text, then up to 3 second texts
    choice_mask = torch.tensor([[True, False, False], [True, True, True], [True, True, False], [False] * 3])
    task_ids = torch.tensor([0, 1, 1, 3])
    labels = torch.tensor([2, 1, 0, 1])
    with torch.no_grad():
        out = model(**x, choice_mask=choice_mask, task_ids=task_ids, labels=labels)
        emb = _mean_pool(model.backbone, x["input_ids"].flatten(0, 1), x["attention_mask"].flatten(0, 1))
    emb = emb.view(4, 4, -1)

    def feats(u, v):
        return torch.cat([u, v, (u - v).abs(), u * v, F.cosine_similarity(u, v, dim=-1)[..., None]], -1)

    expected = torch.full((4, 3), float("-inf"))
    expected[0] = model.heads[0](feats(emb[0, 0], emb[0, 1]))          # pair classification, 3 classes
    for i, n in ((1, 3), (2, 2)):                                       # multiple choice over n choices
        expected[i, :n] = model.heads[1](feats(emb[i, 0].expand(n, -1), emb[i, 1:1 + n])).squeeze(-1)
    expected[3, :2] = model.heads[3](feats(emb[3, 0], emb[3, 0]))       # single text: v = u
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    ce = torch.stack([F.cross_entropy(expected[i:i + 1], labels[i:i + 1]) for i in range(4)]).mean()
    torch.testing.assert_close(out.loss, ce, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="model.encoding=cross"):
        model.task_model_spec(0)
    with pytest.raises(ValueError, match="encoding"):
        MultiTaskHeadModel(BertModel(_config()), SPECS, encoding="dual")


def test_siamese_multiple_choice_starts_at_zero_shot_cosine_ranking():
    torch.manual_seed(1)
    model = MultiTaskHeadModel(BertModel(_config()), SPECS, pooling="mean", encoding="siamese").eval()
    x = _inputs(3, 5, seed=4)
    with torch.no_grad():
        out = model(**x, choice_mask=torch.ones(3, 4, dtype=torch.bool), task_ids=torch.ones(3, dtype=torch.long))
        emb = _mean_pool(model.backbone, x["input_ids"].flatten(0, 1), x["attention_mask"].flatten(0, 1))
    emb = emb.view(3, 5, -1)
    cos = F.cosine_similarity(emb[:, :1], emb[:, 1:], dim=-1)
    torch.testing.assert_close(out.logits, 20.0 * cos, atol=1e-5, rtol=0)
