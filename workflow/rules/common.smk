import itertools
import os
import re
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

# The rules' interpreter: this Snakemake's own Python (the project's virtualenv), or, under `--use-conda`, the
# `python` of the rule's conda environment (environment.yml; the `loki` package imports from the working directory)
try:
    from snakemake.settings.types import DeploymentMethod

    _USE_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
except (ImportError, AttributeError):  # (other Snakemake versions: the virtualenv's Python)
    _USE_CONDA = False
PY = "python" if _USE_CONDA else sys.executable
# the jobs' W&B runs carry the tag "snakemake" (loki.tracking), so a dashboard can tell DAG runs from ad-hoc ones
shell.prefix("export LOKI_SNAKEMAKE=1; ")
CONF = Path(workflow.basedir) / "conf" if (Path(workflow.basedir) / "conf").exists() else Path("conf")
SHARED_WIKITEXT = Path("../shared/data/wikitext-2-raw/wiki.test.raw")


def _conf(group, name):
    p = CONF / group / f"{name}.yaml"
    if not p.exists():
        choices = sorted(q.stem for q in (CONF / group).glob("*.yaml"))
        raise ValueError(f"config: no {group} '{name}' (conf/{group}/{name}.yaml); choose one of {choices}")
    return yaml.safe_load(p.read_text())


EXP = config["experiment"]
_exp = _conf("experiment", EXP)
if _exp.get("experiment_name", EXP) != EXP:
    raise ValueError(f"conf/experiment/{EXP}.yaml sets experiment_name={_exp.get('experiment_name')}; it must be {EXP}")
MODEL = config["model"]
CALIB = config["calib_corpus"]
DATA = config["eval_corpus"]
if DATA == "auto":
    DATA = "wikitext2_local" if SHARED_WIKITEXT.exists() else "enwiki_sample"
_conf("model", MODEL)
THREADS = int(config.get("threads", 2))
TRANSFER_CORPORA = list(config.get("transfer_corpora") or [])
for _c in TRANSFER_CORPORA:
    _conf("corpus", _c)
RES = f"results/{EXP}"
LOGS = f"{RES}/logs"
KEYS = f"{RES}/keys/{MODEL}/{CALIB}"
PCA = f"{RES}/pca/{MODEL}/{CALIB}"
HYDRA_COMMON = f"experiment={EXP} model={MODEL} corpus@calib={CALIB} corpus@data={DATA}"


def _fmt(v):
    return str(v).lower() if isinstance(v, bool) else str(v)


def grid_points():
    """{(eval, tag): (method, {option: value})} from config['grid'].

    Each block's list-valued options are crossed; a block's ``evals`` (default: config['evals']) says
    which evals (conf/eval/<name>.yaml) run at its points.
    """
    points = {}
    default_evals = config.get("evals", ["perplexity"])
    for method, blocks in config["grid"].items():
        known = set(_conf("method", method)) - {"name"}
        for block in blocks:
            block = dict(block)
            evals = block.pop("evals", default_evals)
            unknown = sorted(set(block) - known)
            if unknown:
                raise ValueError(f"config: grid.{method} option(s) {unknown} are not options of '{method}' "
                                 f"(conf/method/{method}.yaml: {sorted(known)}), nor `evals`")
            for ev in evals:
                _conf("eval", ev)
            keys = sorted(block)
            values = [v if isinstance(v, list) else [v] for v in (block[k] for k in keys)]
            for combo in itertools.product(*values):
                opts = dict(zip(keys, combo))
                tag = "-".join([method] + [f"{k}{_fmt(v)}" for k, v in opts.items()])
                for ev in evals:
                    points[(ev, tag)] = (method, opts)
    return points


POINTS = grid_points()
EVALS = sorted({ev for ev, _ in POINTS})
TAGS = sorted({tag for _, tag in POINTS})


def point_overrides(wildcards):
    method, opts = POINTS[(wildcards.eval, wildcards.tag)]
    return " ".join([f"eval={wildcards.eval}", f"method={method}"] + [f"method.{k}={_fmt(v)}" for k, v in opts.items()])


def all_metrics():
    return [f"{RES}/evaluate/{ev}/{tag}/metrics.json" for ev, tag in sorted(POINTS)]


def resource_for_corpus(name):
    """The prepared file a corpus needs, if it is an embedded one ([] otherwise)."""
    c = _conf("corpus", name)
    return [f"resources/corpora/{name}.txt"] if c.get("source") else []


def resource_for_model(name):
    m = _conf("model", name)
    return [f"resources/models/{name}/loki_resource.json"] if m.get("source") else []


def final_targets():
    out = [f"{RES}/summary.csv", f"{RES}/heatmap.png", f"{PCA}/rank.csv"]
    if len(TRANSFER_CORPORA) >= 2:
        out.append(f"{RES}/transfer/transfer.csv")
    return out
