"""How much task signal each reading of a decoder layer's input carries (MoREConfig.contrastive_pooling).

    python bench/contrastive_pooling.py [--seeds 3]

Three synthetic tasks whose texts draw their words from disjoint thirds of the vocabulary, each text
`BOS words... [template]` with 4..15 words, right-padded; the template is three tokens shared by every task (as
a prompt's "Answer:"), or absent. On a random tiny LLaMA (64 wide, 4 layers) it reads every layer's q_proj input
the three ways `pool_tokens` offers and prints, per layer: the held-out accuracy of the nearest task centroid
(cosine; centroids from one half of the examples, scored on the other; chance 1/3), and the spread of the
normalized h across examples (0: the same vector for every example). Mean over the model seeds.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from morelora.tuners.more.layer import pool_tokens

VOCAB, BOS, PAD, TEMPLATE, PER_TASK = 256, 1, 0, [5, 6, 7], 64


def make_batch(template: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, tasks = [], []
    for t in range(3):
        lo = 10 + t * 80
        for _ in range(PER_TASK):
            n = int(torch.randint(4, 16, (1,), generator=gen))
            words = torch.randint(lo, lo + 80, (n,), generator=gen).tolist()
            rows.append([BOS, *words, *(TEMPLATE if template else [])])
            tasks.append(t)
    length = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (length - len(r)) for r in rows])
    return ids, (ids != PAD).long(), torch.tensor(tasks)


def scores(h: torch.Tensor, tasks: torch.Tensor, gen: torch.Generator) -> tuple[float, float]:
    """(held-out nearest-centroid accuracy, spread of the normalized h across examples)."""
    h = F.normalize(h.float(), dim=-1)
    fit = torch.rand(len(tasks), generator=gen) < 0.5
    cent = F.normalize(torch.stack([h[fit & (tasks == t)].mean(0) for t in range(3)]), dim=-1)
    pred = (h[~fit] @ cent.T).argmax(-1)
    return float((pred == tasks[~fit]).float().mean()), float(h.std(0).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for template in (True, False):
        table: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS)
            model = LlamaForCausalLM(cfg).eval()
            gen = torch.Generator().manual_seed(100 + seed)
            ids, mask, tasks = make_batch(template, gen)
            inputs: dict[int, torch.Tensor] = {}
            for i, layer in enumerate(model.model.layers):
                layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a, i=i, d=inputs: d.__setitem__(i, a[0]))
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            for i, x in inputs.items():
                for pooling in ("first", "mean", "last"):
                    table.setdefault((i, pooling), []).append(scores(pool_tokens(x, pooling, mask), tasks, gen))
        print(f"\ntemplate suffix shared by all tasks: {'yes' if template else 'no'} "
              f"(accuracy / spread, mean of {args.seeds} seeds; chance accuracy 0.33)")
        print("layer  " + "  ".join(f"{p:>13}" for p in ("first", "mean", "last")))
        for i in range(4):
            cells = []
            for p in ("first", "mean", "last"):
                acc = sum(a for a, _ in table[(i, p)]) / args.seeds
                spread = sum(s for _, s in table[(i, p)]) / args.seeds
                cells.append(f"{acc:5.2f} / {spread:5.3f}")
            print(f"{i:5d}  " + "  ".join(f"{c:>13}" for c in cells))


if __name__ == "__main__":
    main()
