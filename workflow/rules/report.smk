# The report stage and what `snakemake --report report.html` shows (docs/results.md).
# Figures and tables live in one folder per report category under results/<exp>/report/; a figure is drawn
# only when its data exists (report/tables/contents.html lists what is missing), so each category is a
# directory output whose files are registered by pattern (one caption per category, workflow/report/*.rst).
import glob


report: "../report/workflow.rst"


KERNEL_RESULTS = "kernels/measured"  # python -m kernels.bench --json kernels/measured/<gpu>.json (on a GPU machine)
# Optional report data, as inputs: rank.csv and transfer.csv where this DAG makes them (final targets:
# transfer.csv only when transfer_corpora is set; an unconfigured transfer rule must not be scheduled), and
# bench/decode.json once it exists (`snakemake bench_decode`, or copied from a GPU machine), so the report is
# redone when it changes. The stage also reads what exists but is not an input here (report/tables/contents.html).
REPORT_FROM_DAG = [f"{PCA}/rank.csv", f"{RES}/transfer/transfer.csv"]
REPORT_IF_PRESENT = [f"{RES}/bench/decode.json"]


rule report:
    """Gather every result into the tidy table (summary.csv/.parquet) and draw the report's figures."""
    input:
        metrics=all_metrics(),
        optional=lambda wildcards: [f for f in REPORT_FROM_DAG if f in final_targets()]
        + [f for f in REPORT_IF_PRESENT if os.path.exists(f)]
        + sorted(glob.glob(f"{KERNEL_RESULTS}/*.json")),
    output:
        summary=report(
            f"{RES}/summary.csv", category="Results", caption="../report/summary.rst"
        ),
        parquet=f"{RES}/summary.parquet",
        heatmap=f"{RES}/heatmap.png",
        tables=report(
            directory(f"{RES}/report/tables"),
            patterns=["{name}.html"],
            category="Results",
            caption="../report/tables.rst",
        ),
        rank=report(
            directory(f"{RES}/report/rank"),
            patterns=["{name}.png"],
            category="Key rank",
            caption="../report/rank_layers.rst",
        ),
        quality=report(
            directory(f"{RES}/report/quality"),
            patterns=["{name}.png"],
            category="Quality over (d, k)",
            caption="../report/quality.rst",
        ),
        frontier=report(
            directory(f"{RES}/report/frontier"),
            patterns=["{name}.png", "{name}.html"],
            category="Accuracy vs speed",
            caption="../report/frontier.rst",
        ),
        selection=report(
            directory(f"{RES}/report/selection"),
            patterns=["{name}.png"],
            category="Selection quality",
            caption="../report/selection.rst",
        ),
        transfer=report(
            directory(f"{RES}/report/transfer"),
            patterns=["{name}.png"],
            category="Calibration transfer",
            caption="../report/transfer.rst",
        ),
        speed=report(
            directory(f"{RES}/report/speed"),
            patterns=["{name}.png"],
            category="Speed",
            caption="../report/speed.rst",
        ),
    params:
        py=PY,
        hydra_common=HYDRA_COMMON,
        logs=LOGS,
        kernels=KERNEL_RESULTS,
        experiment=EXP,
        model=MODEL,
        calib=CALIB,
        data=DATA,
        cfg=lambda wc: config_hash("report", HYDRA_COMMON.split()),
    log:
        f"{LOGS}/report.log",
    conda:
        "../../environment.yml"
    shell:
        "{params.py} -m loki.report {params.hydra_common} '++report.expect={input.metrics}' "
        "'++report.kernels_dir={params.kernels}' 'hydra.run.dir={params.logs}/hydra/report' > {log:q} 2>&1"
