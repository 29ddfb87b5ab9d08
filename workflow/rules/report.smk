rule report:
    """Gather every evaluation into summary.csv and draw the perplexity heatmap over (d, k)."""
    input:
        all_metrics(),
    output:
        summary=report(f"{RES}/summary.csv", category="Results", caption="../report/summary.rst"),
        heatmap=report(f"{RES}/heatmap.png", category="Results", caption="../report/heatmap.rst"),
    params:
        py=PY,
        hydra_common=HYDRA_COMMON,
        logs=LOGS,
    log:
        f"{LOGS}/report.log",
    conda:
        "../../environment.yml"
    shell:
        "{params.py} -m loki.report {params.hydra_common} 'hydra.run.dir={params.logs}/hydra/report' > {log} 2>&1"
