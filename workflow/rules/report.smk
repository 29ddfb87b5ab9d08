rule report:
    """Gather every evaluation into summary.csv and draw the perplexity heatmap over (d, k)."""
    input:
        expand(f"{RES}/evaluate/{{tag}}/metrics.json", tag=sorted(POINTS)),
    output:
        summary=report(f"{RES}/summary.csv", category="Results", caption="../report/summary.rst"),
        heatmap=report(f"{RES}/heatmap.png", category="Results", caption="../report/heatmap.rst"),
    log:
        f"{LOGS}/report.log",
    conda:
        "../../environment.yml"
    shell:
        "{PY} -m loki.report {HYDRA_COMMON} 'hydra.run.dir={LOGS}/hydra/report' > {log} 2>&1"
