"""Session 19: the fp8 scoring slab (bench --slab-dtype fp8) under scoring settings keyed by bytes per token rather
than by d (an fp8 slab at d = 32 moves d = 16's bytes): the d < 32 scoring tiles (256 x 2 instead of 128 x 4) and the
rotation PDL (on where d <= 16 for 16-bit slabs).  Usage: PYTHONPATH=. python this.py OUT_PREFIX"""
import sys

import kernels.bench as bench
import kernels.bracket as bracket

out = sys.argv[1]
base_cfg = dict(bracket.BRACKET_SCORE_CONFIG)
variants = {
    "tiles256": dict(BRACKET_SCORE_CONFIG={0: base_cfg[0]}),
    "pdl32": dict(BRACKET_ROTATE_PDL_MAX_D=32),
    "tiles256_pdl32": dict(BRACKET_SCORE_CONFIG={0: base_cfg[0]}, BRACKET_ROTATE_PDL_MAX_D=32),
}
for name, settings in variants.items():
    saved = {k: getattr(bracket, k) for k in settings}
    for k, v in settings.items():
        setattr(bracket, k, v)
    print(f"=== variant {name}: {settings}", flush=True)
    bench.main(["--rep", "20", "--no-stages", "--layout", "rows", "--slab-dtype", "fp8", "--configs",
                "16:16384,16:65536", "--json", f"{out}_{name}.json"])
    for k, v in saved.items():
        setattr(bracket, k, v)
