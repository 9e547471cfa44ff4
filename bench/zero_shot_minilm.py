"""Zero-shot scores of the bundled all-MiniLM-L6-v2 on the offline suite, no training (docs/RESULTS.md, "The demo").

Multiple choice (piqa, openbookqa, arc_easy, arc_challenge; first 300 test documents): the choice whose
mean-pooled embedding has the highest cosine with the query's. Sentence pairs (mrpc, rte; whole test split):
the cosine of the two sentences against a threshold fitted on the training split (the label of "similar" is
MRPC's "equivalent", RTE's "entailment").

    HF_HUB_OFFLINE=1 python bench/zero_shot_minilm.py
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score
from transformers import AutoModel, AutoTokenizer

from morelora.config import bundled_minilm_path
from morelora.data.offline import load_offline_task


def main() -> None:
    torch.set_num_threads(1)
    path = bundled_minilm_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def embed(texts: list[str], max_length: int) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), 64):
            batch = tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    for task in ["piqa", "openbookqa", "arc_easy", "arc_challenge"]:
        rows = load_offline_task(task)["test"][:300]
        queries = embed([r["query"] for r in rows], 64)
        right = [int((embed(r["choices"], 64) @ queries[i]).argmax()) == r["gold"] for i, r in enumerate(rows)]
        print(f"{task:14s} accuracy {np.mean(right):.4f}  (n={len(rows)}, cosine of query and choice)")
    for task, similar in [("mrpc", 1), ("rte", 0)]:
        data = load_offline_task(task)

        def cosines(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
            a, b = embed([r["text"] for r in rows], 128), embed([r["text_pair"] for r in rows], 128)
            return (a * b).sum(-1).numpy(), np.array([r["label"] for r in rows])

        s_train, y_train = cosines(data["train"])
        s_test, y_test = cosines(data["test"])
        threshold = max(np.unique(s_train), key=lambda t: ((s_train >= t) == (y_train == similar)).mean())
        pred = np.where(s_test >= threshold, similar, 1 - similar)
        f1 = f"  f1 {f1_score(y_test, pred):.4f}" if task == "mrpc" else ""
        print(f"{task:14s} accuracy {np.mean(pred == y_test):.4f}{f1}  (n={len(y_test)}, threshold fitted on train)")


if __name__ == "__main__":
    main()
