rule extract_keys:
    """Keys per layer and KV head, pre- and post-RoPE, as safetensors shards + manifest."""
    input:
        resource_for_model(MODEL),
        resource_for_corpus(CALIB),
    output:
        f"{KEYS}/manifest.json",
    params:
        py=PY,
        hydra_common=HYDRA_COMMON,
        logs=LOGS,
    log:
        f"{LOGS}/extract_keys.log",
    conda:
        "../../environment.yml"
    threads: THREADS
    resources:
        gpu=1,
    shell:
        "{params.py} -m loki.extract_keys {params.hydra_common} threads={threads} "
        "'hydra.run.dir={params.logs}/hydra/extract_keys' > {log} 2>&1"


rule fit_pca:
    """IncrementalPCA per (layer, KV head, RoPE side), plus the rank analysis."""
    input:
        f"{KEYS}/manifest.json",
    output:
        pca=f"{PCA}/pca.safetensors",
        rank=f"{PCA}/rank.csv",
        curves=f"{PCA}/explained_variance.csv",
        plot=report(f"{PCA}/rank.png", category="Key rank", caption="../report/rank.rst"),
    params:
        py=PY,
        hydra_common=HYDRA_COMMON,
        logs=LOGS,
    log:
        f"{LOGS}/fit_pca.log",
    conda:
        "../../environment.yml"
    threads: THREADS
    shell:
        "{params.py} -m loki.fit_pca {params.hydra_common} threads={threads} "
        "'hydra.run.dir={params.logs}/hydra/fit_pca' > {log} 2>&1"
