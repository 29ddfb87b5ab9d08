rule evaluate:
    """One method at one grid point: perplexity on the evaluation corpus."""
    input:
        resource_for_model(MODEL),
        resource_for_corpus(DATA),
        pca=f"{PCA}/pca.safetensors",
    output:
        f"{RES}/evaluate/{{tag}}/metrics.json",
    log:
        f"{LOGS}/evaluate/{{tag}}.log",
    params:
        point=point_overrides,
    wildcard_constraints:
        tag="|".join(sorted(POINTS)),
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        gpu=1,
    shell:
        "{PY} -m loki.evaluate {HYDRA_COMMON} {params.point} threads={threads} "
        "'hydra.run.dir={RES}/evaluate/{wildcards.tag}' > {log} 2>&1"
