"""lm-evaluation-harness tasks with any attention method: lm-eval's ``HFLM`` wraps our model object, which
already has the method attached (``loki.attention.attach``), so every forward of every task goes through it.

    python -m loki.evaluate eval=lm_eval eval.tasks=[hellaswag] method=loki method.d=16 method.k=0.25
    python -m loki.evaluate eval=lm_eval eval.tasks=[loki_demo]       # the local demo task (no download)

Hub tasks need internet access (or a populated HF datasets cache). ``eval.include_path`` adds folders of
task YAMLs; ``loki/evals/lm_eval_tasks`` (the local ``loki_demo`` task) is always included.
Metrics: ``results`` (task -> metric -> value, lm-eval's ``,none`` filter suffix dropped), and at the top
level ``accuracy`` (mean ``acc`` over the tasks that report one) and ``<task>/<metric>`` scalars.
"""

from __future__ import annotations

import math
from pathlib import Path

from loki.common import fail

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


def lm_eval_eval(cfg, model, method, device) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise fail(f"eval=lm_eval needs the lm-eval package ({e}).", "pip install lm-eval (pinned in requirements.lock).") from e
    from loki.modeling import load_tokenizer

    ev = cfg.eval
    tasks = list(ev.tasks or [])
    if not tasks:
        raise fail("eval=lm_eval: no tasks given.", "set eval.tasks, e.g. eval.tasks=[loki_demo] or [hellaswag].")
    include = [str(TASKS_DIR)] + [str(Path(p).resolve()) for p in (ev.get("include_path") or [])]
    def missing(tm):
        return [t for t in tasks if t not in tm.all_subtasks and t not in tm.all_groups and t not in tm.all_tags]

    tm = TaskManager(include_path=include, include_defaults=False)  # local tasks only: fast (no index of lm-eval's)
    if missing(tm):
        tm = TaskManager(include_path=include)
    unknown = missing(tm)
    if unknown:
        raise fail(f"eval=lm_eval: unknown task(s) {unknown}.",
                   "use lm-eval task names (`lm_eval ls tasks`), loki_demo, or add a folder of task YAMLs with eval.include_path.")
    tok = load_tokenizer(cfg.model)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=int(ev.get("batch_size", 1)),
              max_length=ev.get("max_length") or None, device=str(device))
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=ev.get("num_fewshot"), limit=ev.get("limit"),
                                  task_manager=tm, log_samples=False, bootstrap_iters=int(ev.get("bootstrap_iters", 0)),
                                  random_seed=int(cfg.get("seed", 0)), numpy_random_seed=int(cfg.get("seed", 0)),
                                  torch_random_seed=int(cfg.get("seed", 0)), fewshot_random_seed=int(cfg.get("seed", 0)))
    results = {}
    for task, metrics in (out or {}).get("results", {}).items():
        row = {}
        for key, val in metrics.items():
            if key == "alias" or not isinstance(val, (int, float)) or isinstance(val, bool):
                continue
            name = key.split(",")[0] if key.endswith(",none") else key
            row[name] = float(val) if math.isfinite(float(val)) else None
        results[task] = row
    accs = [r["acc"] for r in results.values() if r.get("acc") is not None]
    res = {"results": results, "tasks": tasks, "accuracy": sum(accs) / len(accs) if accs else None,
           "limit": ev.get("limit"), "num_fewshot": ev.get("num_fewshot")}
    for task, row in results.items():
        for name, val in row.items():
            if "_stderr" not in name:
                res[f"{task}/{name}"] = val
    return res
