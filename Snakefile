# Loki pipeline: prepare -> extract_keys -> fit_pca -> evaluate (grid over methods and (d, k)) -> report.
# Thin on purpose: the rules live in workflow/rules/, the grid in conf/sweep/<name>.yaml.
#   snakemake --cores 2                                   # default experiment on the embedded model
#   snakemake --cores 2 --configfile conf/sweep/smoke.yaml  # tiny smoke run (CI)
from snakemake.common.configfile import load_configfile
from snakemake.utils import min_version

min_version("9.0")

# The default sweep, unless --configfile names another: a `configfile:` directive would be deep-merged
# with the user's file (its grid entries would leak into, e.g., the smoke grid).  `--config key=value` alone
# replaces that top-level key of the default sweep (e.g. `--config bench=h200`).
_configfiles = getattr(getattr(workflow, "config_settings", None), "configfiles", None)
if not config or not _configfiles:
    config.update({**load_configfile("conf/sweep/default.yaml"), **config})


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/pca.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/bench.smk"


rule all:
    input:
        lambda wildcards: final_targets(),  # (when needed: it composes the grid's configs, workflow/rules/common.smk)
    default_target: True
