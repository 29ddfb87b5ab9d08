rule extract_keys:
    """Keys per layer and KV head, pre- and post-RoPE, as safetensors shards + manifest.

    Resumable: the shards done so far are listed in progress.json, not an output (Snakemake deletes a failed job's
    outputs); manifest.json is written once every shard is in place."""
    input:
        lambda wc: resource_for_model(wc.model) + resource_for_corpus(wc.calib),
    output:
        f"{RES}/keys/{{model}}/{{calib}}/manifest.json",
    params:
        py=PY,
        exp=EXP,
        run_dir=lambda wc: f"{LOGS}/hydra/extract_keys/{wc.model}/{wc.calib}",
        cfg=lambda wc: config_hash("extract_keys", stage_overrides(wc.model, wc.calib)),
    log:
        f"{LOGS}/extract_keys/{{model}}/{{calib}}.log",
    conda:
        "../../environment.yml"
    threads: THREADS
    resources:
        gpu=1,
    shell:
        "{params.py} -m loki.extract_keys experiment={params.exp} model={wildcards.model} corpus@calib={wildcards.calib} "
        "threads={threads} 'hydra.run.dir={params.run_dir}' > {log:q} 2>&1"


rule fit_pca:
    """IncrementalPCA per (layer, KV head, RoPE side), plus the rank analysis."""
    input:
        f"{RES}/keys/{{model}}/{{calib}}/manifest.json",
    output:
        pca=f"{RES}/pca/{{model}}/{{calib}}/pca.safetensors",
        rank=f"{RES}/pca/{{model}}/{{calib}}/rank.csv",
        curves=f"{RES}/pca/{{model}}/{{calib}}/explained_variance.csv",
        plot=f"{RES}/pca/{{model}}/{{calib}}/rank.png",
    params:
        py=PY,
        exp=EXP,
        run_dir=lambda wc: f"{LOGS}/hydra/fit_pca/{wc.model}/{wc.calib}",
        cfg=lambda wc: config_hash("fit_pca", stage_overrides(wc.model, wc.calib)),
    log:
        f"{LOGS}/fit_pca/{{model}}/{{calib}}.log",
    conda:
        "../../environment.yml"
    threads: THREADS
    shell:
        "{params.py} -m loki.fit_pca experiment={params.exp} model={wildcards.model} corpus@calib={wildcards.calib} "
        "threads={threads} 'hydra.run.dir={params.run_dir}' > {log:q} 2>&1"


rule transfer:
    """Calibration transfer: each corpus's keys in every other corpus's top-d PCA basis."""
    input:
        expand(f"{RES}/pca/{MODEL}/{{c}}/pca.safetensors", c=TRANSFER_CORPORA),
        expand(f"{RES}/keys/{MODEL}/{{c}}/manifest.json", c=TRANSFER_CORPORA),
    output:
        csv=f"{RES}/transfer/transfer.csv",
        per_layer=f"{RES}/transfer/transfer_per_layer.csv",
        plot=f"{RES}/transfer/transfer.png",
    params:
        py=PY,
        exp=EXP,
        model=MODEL,
        corpora=",".join(TRANSFER_CORPORA),
        run_dir=f"{LOGS}/hydra/transfer",
        cfg=lambda wc: config_hash("transfer", [f"experiment={EXP}", f"model={MODEL}",
                                                f"transfer.corpora=[{','.join(TRANSFER_CORPORA)}]"]),
    log:
        f"{LOGS}/transfer.log",
    conda:
        "../../environment.yml"
    shell:
        "{params.py} -m loki.transfer experiment={params.exp} model={params.model} "
        "'transfer.corpora=[{params.corpora}]' 'hydra.run.dir={params.run_dir}' > {log:q} 2>&1"
