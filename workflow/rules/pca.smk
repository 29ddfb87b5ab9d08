rule extract_keys:
    """Keys per layer and KV head, pre- and post-RoPE, as safetensors shards + manifest."""
    input:
        resource_for_model(MODEL),
        resource_for_corpus(CALIB),
    output:
        f"{KEYS}/manifest.json",
    log:
        f"{LOGS}/extract_keys.log",
    conda:
        "../../environment.yml"
    threads: THREADS
    resources:
        gpu=1,
    shell:
        "{PY} -m loki.extract_keys {HYDRA_COMMON} threads={threads} "
        "'hydra.run.dir={LOGS}/hydra/extract_keys' > {log} 2>&1"


rule fit_pca:
    """IncrementalPCA per (layer, KV head, RoPE side), plus the rank analysis."""
    input:
        f"{KEYS}/manifest.json",
    output:
        pca=f"{PCA}/pca.safetensors",
        rank=f"{PCA}/rank.csv",
        curves=f"{PCA}/explained_variance.csv",
        plot=report(f"{PCA}/rank.png", category="Key rank", caption="../report/rank.rst"),
    log:
        f"{LOGS}/fit_pca.log",
    conda:
        "../../environment.yml"
    threads: THREADS
    shell:
        "{PY} -m loki.fit_pca {HYDRA_COMMON} threads={threads} "
        "'hydra.run.dir={LOGS}/hydra/fit_pca' > {log} 2>&1"
