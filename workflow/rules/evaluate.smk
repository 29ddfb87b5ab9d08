rule evaluate:
    """One method at one grid point, one eval (conf/eval/<eval>.yaml)."""
    input:
        resource_for_model(MODEL),
        resource_for_corpus(DATA),
        pca=point_pca,  # only methods that read the basis (needs_basis): baselines need no extraction nor fit
    output:
        f"{RES}/evaluate/{{eval}}/{{tag}}/metrics.json",
    log:
        f"{LOGS}/evaluate/{{eval}}/{{tag}}.log",
    params:
        py=PY,
        hydra_common=HYDRA_COMMON,
        run_dir=lambda wildcards, output: os.path.dirname(output[0]),
        point=point_overrides,
        cfg=point_hash,
    wildcard_constraints:
        eval="|".join(EVALS),
        tag="|".join(re.escape(t) for t in TAGS),
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        gpu=1,
    shell:
        "{params.py} -m loki.evaluate {params.hydra_common} {params.point} threads={threads} "
        "'hydra.run.dir={params.run_dir}' > {log:q} 2>&1"
