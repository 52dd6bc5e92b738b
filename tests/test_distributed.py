"""Turbo caches under mlx-lm's distributed mode: 2 ranks of MLX's ring backend on 127.0.0.1.

Each test starts ``mlx.launch --backend ring -n 2`` (free ports picked at run time; the whole
process group is killed on failure or timeout) and compares with the same script run as one
plain process. The ranks load through ``mlx_lm.utils.sharded_load`` (what ``mlx_lm.server``,
``chat`` and ``benchmark`` call), so our patched loader is what runs.

- tensor sharding, real model: mlx-lm's ``llama.Model.shard`` divides heads by the world
  size, and SmolLM2 has 3 KV heads (2-way sharding crashes in mlx-lm itself). The fixture
  writes an *equivalent* SmolLM2 with two copies of every head and MLP unit, output
  projections halved (exact in the 4-bit format: scales and biases halve), laid out so that
  each rank gets one whole copy: 6 KV heads, 3 per rank. Each rank computes half of every
  layer's output and the all_sum restores it exactly, so the 2-rank run must give SmolLM2's
  own greedy tokens. (With heads split so that ranks hold *different* heads, the all_sum
  changes float summation order; logits then move ~1e-5 with mlx-lm's fp16 cache, and the
  4-bit codes amplify that: see reports/distributed.md.)
- pipeline sharding: llama has no pipeline in mlx-lm 0.32.2, so a tiny random qwen2 (which
  has one) with the SmolLM2 tokenizer, and RateQuant on: layers are renumbered per rank,
  allocation is merged and broadcast.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODEL_DIR, ROOT, smollm2_path


@pytest.fixture(scope="module", autouse=True)
def _smollm2():
    smollm2_path()  # SmolLM2's tokenizer and weights (fetched if missing)

PROMPT = "The history of the Roman Empire is long and complicated. It began"
TOKENS = 16
# mlx.launch (its console script's code, with this interpreter)
LAUNCH = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; "
          "sys.argv[0] = 'mlx.launch'; sys.exit(main())"]

# Run by each rank (and once as a single process). Prints nothing; writes out/rank<r>.json.
RANK_SCRIPT = r'''
import json, sys
import mlx.core as mx
import mlx_lm.utils
from mlx_lm.generate import stream_generate
from mlx_lm.models import cache as mlx_cache
from mlx_lm_turbo import patch
from mlx_lm_turbo.cache import TurboConfig, TurboKVCache

model_dir, kind, cfg, prompt, n, out = sys.argv[1:7]
patch.apply()
patch.set_config(TurboConfig(**json.loads(cfg)))
group = mx.distributed.init()
if group.size() > 1:  # what mlx_lm.server / chat / benchmark do under mlx.launch
    pipe = group if kind == "pipeline" else None
    model, tok = mlx_lm.utils.sharded_load(model_dir, pipe, None if pipe else group)
else:
    model, tok = patch.load(model_dir)  # what mlx_lm.generate loads with
caches = mlx_cache.make_prompt_cache(model)
tokens = [r.token for r in stream_generate(model, tok, prompt, max_tokens=int(n),
                                           prompt_cache=caches)]
turbo = [c for c in caches if isinstance(c, TurboKVCache)]
info = {"rank": group.rank(), "size": group.size(), "tokens": tokens,
        "kv_bytes": sum(c.nbytes for c in turbo), "n_caches": len(caches),
        "layers": [c.layer for c in turbo], "seeds": [c.seed for c in turbo],
        "bits": [[c.key_bits, c.value_bits] for c in turbo],
        "kv_heads": [next(iter(c.keys.values())).shape[1] for c in turbo],
        "layer_bits": patch.get_config().layer_bits}
with open(f"{out}/rank{group.rank()}.json", "w") as f:
    json.dump(info, f)
'''


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")  # two ranks share two cores
    return env


def _free_port_pair() -> int:
    """A port p with p and p+1 free (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 1))
            return port
    raise RuntimeError("no two consecutive free ports")


def run_group(argv: list, tmp_path: Path, timeout: int = 120, ranks: int = 2,
              env: dict = None) -> subprocess.CompletedProcess:
    """``argv`` as ``ranks`` ring ranks on 127.0.0.1 (1: a plain process); the process group
    is killed on timeout or failure so no rank outlives the test."""
    cmd = argv if ranks == 1 else [*LAUNCH, "--backend", "ring", "-n", str(ranks), "-p",
                                   str(_free_port_pair()), "--", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=env or _env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} timed out after {timeout} s\n{err[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stray ranks of a failed launch
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def generate(tmp_path: Path, model_dir: Path, kind: str, cfg: dict, ranks: int) -> list:
    out = tmp_path / f"{Path(model_dir).name}-{kind}-{ranks}"
    out.mkdir()
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    r = run_group([sys.executable, str(script), str(model_dir), kind, json.dumps(cfg), PROMPT,
                   str(TOKENS), str(out)], tmp_path, ranks=ranks)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(ranks)]


# ------------------------------------------------------------------ models on disk
def _copy_tokenizer(dst: Path) -> None:
    for f in MODEL_DIR.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, dst / f.name)


def _take_chunks(layer, n: int, order: list, axis: int, halve: bool) -> None:
    """Rebuild ``layer``'s arrays from ``n`` chunks (heads, or 1 for the MLP) along ``axis``
    (rows: 0, input columns: -1) taken in ``order``; ``halve`` halves the float arrays (for a
    4-bit layer its scales and biases: the dequantized weight halves, exactly)."""
    import mlx.core as mx

    for name, a in list(layer.parameters().items()):
        if name == "bias" and axis != 0:
            continue  # an output bias is not split over inputs
        chunks = mx.split(a, n, axis=axis)
        b = mx.concatenate([chunks[h] for h in order], axis=axis)
        if halve and mx.issubdtype(b.dtype, mx.floating):
            b = b / 2
        setattr(layer, name, b)


def double_for_tensor_sharding(model, config: dict) -> dict:
    """The same function with two copies of every head and MLP unit, laid out so that
    ``model.shard`` over 2 ranks gives each rank one whole copy whose output projections
    (o_proj, down_proj) are halved: each rank computes exactly half of the original layer
    output and mlx-lm's all_sum adds the halves (x/2 + x/2 = x, exactly in floating point).
    SmolLM2 has 3 KV heads, which mlx-lm cannot split over 2 ranks; this copy has 6."""
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    twice = lambda n: list(range(n)) * 2  # noqa: E731
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        _take_chunks(a.q_proj, nq, twice(nq), axis=0, halve=False)
        _take_chunks(a.k_proj, nkv, twice(nkv), axis=0, halve=False)
        _take_chunks(a.v_proj, nkv, twice(nkv), axis=0, halve=False)
        _take_chunks(a.o_proj, nq, twice(nq), axis=-1, halve=True)
        _take_chunks(m.gate_proj, 1, [0, 0], axis=0, halve=False)
        _take_chunks(m.up_proj, 1, [0, 0], axis=0, halve=False)
        _take_chunks(m.down_proj, 1, [0, 0], axis=-1, halve=True)
        a.n_heads, a.n_kv_heads = 2 * nq, 2 * nkv
    return {**config, "num_attention_heads": 2 * nq, "num_key_value_heads": 2 * nkv,
            "intermediate_size": 2 * config["intermediate_size"]}


@pytest.fixture(scope="module")
def doubled_smollm2(tmp_path_factory) -> Path:
    """``double_for_tensor_sharding`` of SmolLM2 (6 KV heads), saved as a 4-bit model."""
    import mlx.core as mx
    from mlx_lm.utils import load, save_config, save_model

    dst = tmp_path_factory.mktemp("smollm2-kv6")
    model, _ = load(str(MODEL_DIR))
    config = json.loads((MODEL_DIR / "config.json").read_text())
    config = double_for_tensor_sharding(model, config)
    mx.eval(model.parameters())
    save_model(dst, model)
    save_config(config, dst / "config.json")
    _copy_tokenizer(dst)
    return dst


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A random 4-layer qwen2 (mlx-lm gives qwen2 a pipeline) with SmolLM2's tokenizer."""
    import mlx.core as mx
    from mlx_lm.models import qwen2
    from mlx_lm.utils import save_config, save_model

    config = {"model_type": "qwen2", "hidden_size": 128, "num_hidden_layers": 4,
              "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-5, "vocab_size": 49152, "tie_word_embeddings": True}
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    dst = tmp_path_factory.mktemp("qwen2-tiny")
    save_model(dst, model)
    save_config(config, dst / "config.json")
    _copy_tokenizer(dst)
    return dst


# ------------------------------------------------------------------ tests
def test_doubled_model_is_the_same_function(doubled_smollm2):
    """The fixture is honest: the 6-KV-head copy computes what SmolLM2 computes."""
    import mlx.core as mx
    from mlx_lm.utils import load

    ids = mx.array([[1, 504, 2821, 282, 4649, 314, 253, 2048, 30]])
    a = load(str(MODEL_DIR))[0](ids)
    b = load(str(doubled_smollm2))[0](ids)
    assert a.shape == b.shape
    assert float(mx.abs(a - b).max()) <= 1e-3 * float(mx.abs(a).max())


@pytest.mark.slow
def test_tensor_sharding_real_model(tmp_path, doubled_smollm2):
    """2 ranks (tensor sharding, 4-bit cache): the greedy tokens of SmolLM2 in one process,
    and each rank holds half the KV bytes of the same (doubled) model in one process."""
    cfg = {"key_method": "turboquant_mse", "key_bits": 4}
    single, = generate(tmp_path, MODEL_DIR, "tensor", cfg, ranks=1)
    doubled, = generate(tmp_path, doubled_smollm2, "tensor", cfg, ranks=1)
    ranks = generate(tmp_path, doubled_smollm2, "tensor", cfg, ranks=2)
    assert [r["size"] for r in ranks] == [2, 2] and len(single["tokens"]) == TOKENS
    assert doubled["kv_heads"] == [6] * 30
    for r in ranks:
        assert r["tokens"] == single["tokens"], (r["rank"], r["tokens"], single["tokens"])
        assert r["kv_heads"] == [3] * 30 and r["layers"] == doubled["layers"]
        assert r["seeds"] == doubled["seeds"] and r["bits"] == doubled["bits"] == [[4, 4]] * 30
        half = doubled["kv_bytes"] / 2
        assert abs(r["kv_bytes"] - half) <= 0.02 * half, (r["kv_bytes"], doubled["kv_bytes"])


@pytest.mark.slow
def test_pipeline_sharding_global_layers_and_ratequant(tmp_path, tiny_qwen2):
    """2 ranks (pipeline): each rank's caches carry the global layer numbers (seeds and
    RateQuant bits), rank 0's allocation reaches rank 1, output and bytes as expected."""
    cfg = {"key_method": "turboquant_mse", "key_bits": 4, "ratequant_target": 3.0}
    single, = generate(tmp_path, tiny_qwen2, "pipeline", cfg, ranks=1)
    ranks = generate(tmp_path, tiny_qwen2, "pipeline", cfg, ranks=2)
    alloc = single["layer_bits"]
    assert len(alloc) == 4 and len({tuple(b) for b in alloc}) > 1  # RateQuant really ran
    # mlx-lm gives rank 0 the last layers; every rank holds the whole allocation
    assert [r["layers"] for r in ranks] == [[2, 3], [0, 1]]
    for r in ranks:
        assert r["layer_bits"] == alloc
        assert r["bits"] == [alloc[i] for i in r["layers"]]
        assert r["tokens"] == single["tokens"], (r["rank"], r["tokens"], single["tokens"])
    assert sum(r["kv_bytes"] for r in ranks) == single["kv_bytes"]


HOOK_SCRIPT = r'''
import site, sys
site.addsitedir(sys.argv[1])  # what the interpreter does with site-packages at start-up
import mlx.core as mx
assert "mlx_lm_turbo" not in sys.modules
import mlx_lm
import mlx_lm.models.base as base
import mlx_lm.utils
patched = getattr(base, "_mlx_lm_turbo_patched", False)
print(f"rank {mx.distributed.init().rank()} of {mx.distributed.init().size()}: "
      f"patched={patched} sharded_load={mlx_lm.utils.sharded_load.__module__}")
'''


def test_hook_patches_processes_started_by_mlx_launch(tmp_path):
    """Each rank mlx.launch starts processes our .pth and is patched on ``import mlx_lm``,
    without importing mlx_lm_turbo itself."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    shutil.copy(ROOT / "mlx_lm_turbo.pth", site_dir)
    script = tmp_path / "hook.py"
    script.write_text(HOOK_SCRIPT)
    r = run_group([sys.executable, str(script), str(site_dir)], tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(ln for ln in r.stdout.splitlines() if ln.startswith("rank"))
    assert lines == [f"rank {i} of 2: patched=True sharded_load=mlx_lm_turbo.patch"
                     for i in range(2)], r.stdout + r.stderr[-2000:]


def test_bench_script_tiny(tmp_path):
    """scripts/bench_distributed.py end to end on tiny shapes (one process, CPU)."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_distributed.py"),
                        "--tiny", "--out", str(out)], capture_output=True, text=True,
                       env=_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {row["cache"]: row for row in data["results"]}
    assert set(rows) == {"fp16", "turboquant_mse 3-bit"}
    fp16, ours = rows["fp16"], rows["turboquant_mse 3-bit"]
    assert fp16["context"] == ours["context"] == data["context"]
    assert fp16["decode_tok_s"] > 0 and ours["decode_tok_s"] > 0
    # 3 bits + a norm per vector vs 16 bits: at least 3x fewer KV bytes
    assert ours["kv_bytes_per_rank"] * 3 < fp16["kv_bytes_per_rank"]
    assert "decode tok/s" in r.stdout
