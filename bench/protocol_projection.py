"""The protocol's expected MDE (MoRE vs LoRA, test examples only) from the pilot's validation predictions.

    python bench/protocol_projection.py [PILOT_DIR]     # default runs/protocol-pilot (lora/seed0, more/seed0)

Per task: the variance of the per-example correctness difference on validation (one seed each), scaled to the
protocol's test-set size; on the average of the 5 tasks SE = sqrt(sum var_t / n_t) / 5 and MDE = 2.80 SE (80 %
power, two-sided 5 %, normal). One seed per method: an upper bound for the example term of 5 pooled seeds (their
disagreements partly average out) that leaves out the between-seed term.
"""
import math
import sys
from pathlib import Path

import numpy as np

from morelora.training import load_run
from morelora.training.evaluate import evaluate

tasks = ["sst2", "piqa", "openbookqa", "arc_easy", "arc_challenge"]
test_n = {"sst2": 262, "piqa": 1838, "openbookqa": 500, "arc_easy": 2376, "arc_challenge": 1172}
pilot = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/protocol-pilot")
preds = {}
for m in ["lora", "more"]:
    run = load_run(pilot / m / "seed0")
    # other tasks: no validation examples (evaluate skips them); task indices stay those of the model's heads
    run.data = [d if s.name in tasks else {**d, "validation": []} for s, d in zip(run.specs, run.data)]
    r = evaluate(run, "validation", 64, keep_predictions=True)
    preds[m] = r["predictions"]
tot = 0.0
rows = []
for t in tasks:
    a, b = preds["more"][t], preds["lora"][t]
    ca = np.array([p == q for p, q in zip(a["predictions"], a["references"])], float)
    cb = np.array([p == q for p, q in zip(b["predictions"], b["references"])], float)
    d = ca - cb
    var = d.var(ddof=1)
    disagree = float(np.mean(np.array(a["predictions"]) != np.array(b["predictions"])))
    se_t = math.sqrt(var / test_n[t])
    rows.append((t, len(d), disagree, var, se_t))
    tot += var / test_n[t]
se_avg = math.sqrt(tot) / len(tasks)
for t, n, dis, var, se in rows:
    print(f"{t}: val n {n}, disagreement {dis:.3f}, var(diff) {var:.3f}, test n {test_n[t]}, "
          f"SE {100 * se:.2f} pts, MDE {100 * 2.80 * se:.2f} pts")
print(f"average over 5 tasks: SE {100*se_avg:.2f} pts, example-only MDE (normal) {100*2.80*se_avg:.2f} pts")
