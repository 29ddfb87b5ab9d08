"""kernels.bench's ablation table: every VARIANTS entry names settings that exist, and applying one sets them."""
import pytest
import torch

import kernels.attention as attention
import kernels.bench as bench
import kernels.bracket as bracket

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def test_every_variant_names_existing_settings():
    mods = bench._variant_modules()
    for name, settings in bench.VARIANTS.items():
        for key in settings:
            assert key in mods, f"variant {name!r}: {key} is not a setting kernels.bench knows"
            assert hasattr(mods[key], key), f"variant {name!r}: {mods[key].__name__} has no {key} (stale variant?)"


def test_apply_variant_sets_module_defaults(monkeypatch):
    for key, mod in bench._variant_modules().items():  # restored after the test
        monkeypatch.setattr(mod, key, getattr(mod, key))
    settings = bench.apply_variant("s8_c512w4_f16")
    assert bracket.BRACKET_CLASSIFY_BLOCK == 512 and bracket.BRACKET_WARPS == 16
    assert attention.SPARSE_CONFIG == settings["SPARSE_CONFIG"]
    bench.apply_variant("s8_base")
    assert attention.SPARSE_CONFIG["ahead"] is False and attention.SPARSE_CONFIG["num_stages"] == 3
    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        bench.apply_variant("nope")


def test_defaults_variant_is_the_module_defaults(monkeypatch):
    """"s17_base" names every setting at its module default (session 17's code; all but the scan kernel's, which
    only classify="scan" reads), so A/B runs against it compare with what `loki_decode` runs, whatever ran before."""
    mods = bench._variant_modules()
    defaults = {key: getattr(mod, key) for key, mod in mods.items()}
    for key, mod in mods.items():  # restored after the test
        monkeypatch.setattr(mod, key, defaults[key])
    assert set(mods) - set(bench.VARIANTS["s17_base"]) == {"BRACKET_SCAN_BLOCK", "BRACKET_SCAN_WARPS"}
    for key, mod in mods.items():  # scramble what a variant run before would have left
        if key in bench.VARIANTS["s17_base"]:
            monkeypatch.setattr(mod, key, object())
    bench.apply_variant("s17_base")
    assert {key: getattr(mod, key) for key, mod in mods.items()} == defaults


@pytest.mark.skipif(ON_GPU, reason="a CPU-interpreter smoke run of the benchmark (a GPU runs the benchmark itself)")
def test_layout_probe_smoke(tmp_path):
    """`python -m kernels.bench --smoke --layout-probe` (session 13) under the interpreter: the sparse attention gives
    the same output (to fp16 rounding) over the same values in the split, rows and padded layouts, and the JSON
    records each time."""
    import json
    import os
    import subprocess
    import sys
    out = tmp_path / "probe.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-m", "kernels.bench", "--smoke", "--layout-probe", "--json", str(out)],
                   check=True, env=env, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["layout_probe"]
    assert rows and all(r["max_rel_diff"] < 3e-3 for r in rows)  # (fp16 in the smoke run; one dot or two)
    assert all(r[f"{name}_us"] > 0 for r in rows for name in ("split", "rows", "rows_narrow", "rest_padded"))


def test_floor_smoke():
    """`python -m kernels.floor --smoke` (session 14): the two plain bandwidth kernels the floor table is built from
    compute what they claim (scores: max over heads of q . k; gather: softmax attention over the selected rows)."""
    from kernels import floor
    err_s, err_g = floor.smoke(DEVICE)
    if ON_GPU:  # (bf16 inputs, fp32 accumulation; p rounded to bf16 for the second dot)
        assert err_s < 1e-4 and err_g < 2e-2
    else:
        assert err_s < 1e-5 and err_g < 1e-5
    table, points = floor.floor_table([
        dict(kind="sdpa", context=16384, us=240.0),
        *[dict(kind="stream", context=16384, d=dd, us=20.0 if dd == 16 else 36.0) for dd in (16, 32)],
        *[dict(kind="gather", context=16384, k_frac=kf, us=270.0 / kf) for kf in (4, 8, 16)]])
    p = {(r["d"], r["k_frac"]): r for r in points}
    assert p[(16, 16)]["left_us"] == 240.0 / 5 - 20.0 - 270.0 / 16 and "| 16K | (D/8, 1/16) |" in table
