import copy
import functools
import hashlib
import itertools
import json
import os
import re
import shlex
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
_conf("corpus", CALIB)
_conf("corpus", DATA)
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
    """A grid value as Hydra's override grammar reads it (None -> null: Hydra reads `None` as a string)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def _tag_part(v):
    """A grid value in a job's folder name: as `_fmt`, less what a path, a shell or Hydra's grammar would read
    (a list [0,1] -> 0_1; `hydra.run.dir=...[0,1]` is a Hydra parse error and `> log[0,1]` a shell glob)."""
    return _TAG_UNSAFE.sub("_", _fmt(v)).strip("_")


def grid_points():
    """{(eval, tag): (method, {option: value})} from config['grid'].

    Each block's list-valued options are crossed; a block's ``evals`` (default: config['evals']) says
    which evals (conf/eval/<name>.yaml) run at its points.
    """
    points = {}
    default_evals = config.get("evals", ["perplexity"])
    for method, blocks in config["grid"].items():
        defaults = _conf("method", method)
        known = set(defaults) - {"name"}
        for block in blocks:
            block = dict(block)
            evals = block.pop("evals", default_evals)
            if isinstance(evals, str):
                evals = [evals]
            unknown = sorted(set(block) - known)
            if unknown:
                raise ValueError(f"config: grid.{method} option(s) {unknown} are not options of '{method}' "
                                 f"(conf/method/{method}.yaml: {sorted(known)}), nor `evals`")
            for ev in evals:
                _conf("eval", ev)
            keys = sorted(block)
            values = [v if isinstance(v, list) else [v] for v in (block[k] for k in keys)]
            for combo in itertools.product(*values):
                # an option at its conf/method default is not part of the point (as loki.evaluate.run_tag names
                # it): `rope: post` or `group_reduce: max` written out is the same job as leaving it out
                opts = {k: v for k, v in zip(keys, combo)
                        if k in ("d", "k") or json.dumps(v) != json.dumps(defaults.get(k))}
                tag = "-".join([method] + [f"{k}{_tag_part(v)}" for k, v in opts.items()])
                for ev in evals:
                    if points.get((ev, tag), (method, opts)) != (method, opts):
                        raise ValueError(f"config: grid.{method} points {points[(ev, tag)][1]} and {opts} share the "
                                         f"folder name '{tag}'; write one of the values differently")
                    points[(ev, tag)] = (method, opts)
    return points


POINTS = grid_points()
EVALS = sorted({ev for ev, _ in POINTS})
TAGS = sorted({tag for _, tag in POINTS})


def point_groups(ev, tag):
    method, _ = POINTS[(ev, tag)]
    return [f"eval={ev}", f"method={method}"]


def point_options(ev, tag):
    """The `method.<option>=<value>` overrides of a grid point."""
    _, opts = POINTS[(ev, tag)]
    return [f"method.{k}={_fmt(v)}" for k, v in opts.items()]


def point_overrides(wildcards):
    # quoted: a list value ([0,1]) is a shell glob, a string may hold a space
    ev, tag = wildcards.eval, wildcards.tag
    return " ".join(shlex.quote(o) for o in point_groups(ev, tag) + point_options(ev, tag))


# ----------------------------------------------------------------------------------------------------------
# Rerun on config edits. The rules pass `experiment=<name>` and a few overrides, so an edit under conf/ changes no
# file Snakemake knows about. Each job's params therefore carry `cfg`, a hash of the config its stage reads, composed
# by Hydra with the rule's overrides: Snakemake reruns a job whose params changed (rerun trigger `params`, on by
# default), and its dependents through their inputs. The shared keys (model, device, seed, paths, and any new
# top-level key) count for every stage; a stage's own sections only for the stages that read them (loki/<stage>.py),
# so an eval edit reruns evaluations, not extraction (a top-level key only some stages read is listed
# with them). Never hashed: where a job logs, its threads, W&B, and the speed knobs of _NOT_HASHED_IN.
STAGE_SECTIONS = {
    "extract_keys": ["calib", "extract"],
    "fit_pca": ["calib", "pca"],
    "transfer": ["transfer"],
    "evaluate": ["data", "method", "eval", "allow_foreign_basis"],
    "report": ["calib", "data", "report"],
    "bench_decode": ["method", "bench", "allow_foreign_basis"],
}
_OWN_SECTIONS = {s for sections in STAGE_SECTIONS.values() for s in sections}
_NOT_HASHED = {"hydra", "threads", "wandb", "prepare_target"}
# keys inside a stage's section that change how fast it runs, not what it writes (like `threads`)
_NOT_HASHED_IN = {"pca": {"n_jobs"}, "extract": {"batch_size", "stop_after_shards"}}


@functools.cache
def _compose(overrides):
    """Hydra's config for a tuple of overrides, once per distinct tuple (~0.1 s each)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.resolve()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@functools.cache
def job_config(overrides, options=()):
    """The resolved config (a dict) of a job: `overrides` (groups and experiment) composed once and cached; the
    point's `options` (key=value) applied to a copy as Hydra applies value overrides, so 100 grid points of a few
    methods compose a few times, not 100."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    cfg = _compose(tuple(overrides))
    if options:
        cfg = copy.deepcopy(cfg)
        for o in OverridesParser.create().parse_overrides(list(options)):
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
    return OmegaConf.to_container(cfg, resolve=True)


def config_hash(stage, overrides, options=()):
    cfg = job_config(tuple(overrides), tuple(options))
    used = {k: v for k, v in cfg.items()
            if k not in _NOT_HASHED and (k not in _OWN_SECTIONS or k in STAGE_SECTIONS[stage])}
    for section, keys in _NOT_HASHED_IN.items():
        if isinstance(used.get(section), dict):
            used[section] = {k: v for k, v in used[section].items() if k not in keys}
    return hashlib.sha256(json.dumps(used, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_overrides(model, calib):
    return [f"experiment={EXP}", f"model={model}", f"corpus@calib={calib}"]


def point_config(ev, tag):
    return job_config(tuple(HYDRA_COMMON.split() + point_groups(ev, tag)), tuple(point_options(ev, tag)))


def point_hash(wildcards):
    ev, tag = wildcards.eval, wildcards.tag
    return config_hash("evaluate", HYDRA_COMMON.split() + point_groups(ev, tag), point_options(ev, tag))


def needs_basis(ev, tag):
    """Whether a point's method reads the PCA file (pca_path): loki, loki_h2o and pca_attn with `basis: offline`;
    the baselines and `basis: online` do not, so a grid of them alone needs no key extraction nor PCA fit."""
    method = point_config(ev, tag)["method"]
    return "basis" in method and method["basis"] != "online"


def point_pca(wildcards):
    return [f"{PCA}/pca.safetensors"] if needs_basis(wildcards.eval, wildcards.tag) else []


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
    out = [f"{RES}/summary.csv", f"{RES}/heatmap.png"]
    # the key-rank analysis comes with the PCA fit: where a grid point needs the basis, or the transfer matrix fits it
    if any(needs_basis(ev, tag) for ev, tag in sorted(POINTS)) or (len(TRANSFER_CORPORA) >= 2 and CALIB in TRANSFER_CORPORA):
        out.append(f"{PCA}/rank.csv")
    if len(TRANSFER_CORPORA) >= 2:
        out.append(f"{RES}/transfer/transfer.csv")
    return out
