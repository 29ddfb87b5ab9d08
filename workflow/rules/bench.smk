# Decode latency in real generation (loki/bench.py, conf/bench/<name>.yaml): dense (SDPA, static cache),
# dense flash-decoding and Loki at the configured (d, k); time per output token, tokens/s, prefill, attention
# share, cache bytes. Not a default target: `snakemake --cores 2 bench_decode` (Snakemake config key `bench`,
# default cpu: the embedded model at small sizes, with the pipeline's PCA basis; bench=h200 is a random-weight
# Llama-3-8B shape on a GPU, see docs/generation.md).
BENCH = config.get("bench", "cpu")
_bench = _conf("bench", BENCH)


rule bench_decode:
    """Decode latency benchmark -> results/<exp>/bench/decode.json (rows read by the report)."""
    input:
        resource_for_model(MODEL),
        pca=[f"{PCA}/pca.safetensors"] if _bench.get("model_source") == "config" else [],
    output:
        f"{RES}/bench/decode.json",
    log:
        f"{LOGS}/bench/decode.log",
    params:
        py=PY,
        hydra_common=HYDRA_COMMON,
        bench=f"bench={BENCH}",
        cfg=lambda wc: config_hash("bench_decode", HYDRA_COMMON.split() + [f"bench={BENCH}"]),
        run_dir=lambda wildcards, output: os.path.join(os.path.dirname(output[0]), "run"),
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        gpu=1,
    shell:
        "{params.py} -m loki.bench {params.hydra_common} {params.bench} threads={threads} "
        "'bench.out={output}' 'hydra.run.dir={params.run_dir}' > {log:q} 2>&1"
