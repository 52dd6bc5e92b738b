"""End-to-end run of the quality evaluator on a tiny slice (a few hundred tokens)."""

import json
import math
from pathlib import Path

import pytest

from mlx_lm_turbo import eval as ev

from conftest import NEEDS_SHARED_DATA, SHARED

MODEL = Path(ev.DEFAULT_MODEL)
DATA = SHARED / "data"

# The evaluator's protocol is WikiText-2 and the prompts of ../shared/data (and its staged model).
needs_data = pytest.mark.skipif(
    not (MODEL / "config.json").exists() or not (DATA / "wikitext2_test.raw").exists(),
    reason=NEEDS_SHARED_DATA)


def test_parse_spec():
    s = ev.parse_spec("affine4g32")
    assert (s.kind, s.bits, s.group_size) == ("affine", 4, 32)
    s = ev.parse_spec("k4v2-mse")
    assert (s.turbo.key_bits, s.turbo.value_bits) == (4, 2)
    assert s.turbo.key_method == s.turbo.value_method == "turboquant_mse"
    s = ev.parse_spec("prod3")
    assert (s.turbo.key_method, s.turbo.value_method) == ("turboquant_prod", "turboquant_mse")
    s = ev.parse_spec("rvq1")
    assert s.turbo.key_method == "turboquant_rvq" and s.turbo.key_bits == 1
    s = ev.parse_spec("k4v2-mse-c-w16")
    assert s.turbo.center_keys and s.turbo.fp16_window == 16 and s.turbo.key_bits == 4
    assert not s.turbo.scale_keys
    t = ev.parse_spec("k4v2-mse-w16").turbo     # the defaults: centred and scaled keys
    assert t.center_keys and t.scale_keys
    t = ev.parse_spec("mse4-raw").turbo
    assert not (t.center_keys or t.scale_keys) and t.key_bits == 4
    with pytest.raises(ValueError):
        ev.parse_spec("nonsense")
    with pytest.raises(ValueError):
        ev.parse_spec("fp16-c")


@needs_data
def test_quick_end_to_end(tmp_path):
    results = ev.main(["--quick", "--data-dir", str(DATA), "--configs", "fp16,affine8g64,mse8", "--check", "mse8",
                       "--out-dir", str(tmp_path)])
    rows = {r["name"]: r for r in results["configs"]}
    fp16, mse8, aff8 = rows["fp16"], rows["mse8"], rows["affine8g64"]
    assert math.isfinite(fp16["ppl"]) and 1.0 < fp16["ppl"] < 1000
    assert abs(mse8["ppl"] / fp16["ppl"] - 1) < 0.02
    assert abs(aff8["ppl"] / fp16["ppl"] - 1) < 0.02
    # bytes come from the caches: fp16 holds 16 bits/elt, ours far less
    assert fp16["kv"]["bits_per_element"] == pytest.approx(16.0)
    assert aff8["kv"]["bits_per_element"] == pytest.approx(8.5)
    assert mse8["kv"]["bits_per_element"] < 8.5
    assert mse8["kv"]["kv_bytes"] < fp16["kv"]["kv_bytes"] / 1.9
    assert fp16["greedy"]["agreement"] == 1.0
    assert 0.0 <= mse8["greedy"]["agreement"] <= 1.0
    assert 0.0 <= fp16["needle"]["rate"] <= 1.0
    check = results["prefill_vs_decode"][0]
    # identical inputs: equal up to float noise (at 8 bits a 1-ulp difference can move
    # a coordinate to the neighbouring centroid, a ~1% change of one output)
    assert check["layer0_attention_max_abs_diff"] < 0.05 * check["layer0_attention_max_abs_output"]
    assert abs(check["ppl_block"] / check["ppl_token"] - 1) < 0.05
    for name in ("quality.md", "quality.json"):
        assert (tmp_path / name).exists()
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["settings"]["ppl_windows"] == 1
    assert "| fp16 |" in (tmp_path / "quality.md").read_text()


@needs_data
def test_resume_merges_parallel_runs(tmp_path):
    """Rows of runs made in parallel (``--resume a.json,b.json``) are kept, not re-run."""
    first = ev.main(["--quick", "--data-dir", str(DATA), "--configs", "fp16,mse8", "--check", "", "--prompts", "0",
                     "--needle-lengths", "", "--out-dir", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "quality.json").read_text())
    a = dict(saved, configs=[r for r in saved["configs"] if r["name"] != "mse8"])
    b = dict(saved, configs=[r for r in saved["configs"] if r["name"] == "mse8"])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    merged = ev.main(["--quick", "--data-dir", str(DATA), "--configs", "fp16,mse8", "--check", "", "--prompts", "0",
                      "--needle-lengths", "", "--resume",
                      f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}",
                      "--out-dir", str(tmp_path / "m")])
    before = {r["name"]: r for r in first["configs"]}
    after = {r["name"]: r for r in merged["configs"]}
    assert after["mse8"]["ppl"] == before["mse8"]["ppl"]
    assert after["mse8"]["seconds"] == before["mse8"]["seconds"]   # kept, not re-run
    assert merged["settings"]["resumed_rows"] == ["fp16", "mse8"]
