"""Session 20: the whole-model GPU acceptance (loki.bench_core.acceptance) over seeds, one process per
(KERNELS_SCORES_PACK, seed), to see whether the packed score operand moves the kernel-vs-reference logit error.

    for p in 0 1; do for s in 0 1 2; do KERNELS_SCORES_PACK=$p PYTHONPATH=. python3 \
        kernels/bench_results/s20_probes/accept_seeds.py $s out.jsonl & done; done; wait
"""
import json
import os
import sys

from loki.bench_core import acceptance

seed, out = int(sys.argv[1]), sys.argv[2]
rep = acceptance("cuda", steps=32, seed=seed, log=lambda *a: None)
row = {"pack": os.environ.get("KERNELS_SCORES_PACK", "1"), "seed": seed, "passed": rep["passed"],
       "variants": {n: {k: v[k] for k in ("max_logit_rel_err", "graph_logit_rel_err", "logit_tol", "untied_steps",
                                          "untied_agree", "tied_disagree", "passed")}
                    for n, v in rep["variants"].items()}}
with open(out, "a") as f:
    f.write(json.dumps(row) + "\n")
print(json.dumps(row))
