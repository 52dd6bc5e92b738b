"""Where a TurboQuant cache's attention error comes from, layer by layer.

    python scripts/diagnose_keys.py --model models/qwen25-coder-0.5b --data-dir DATA --tokens 1024

One fp32 forward pass records every layer's queries, keys and values (post-RoPE, as the
cache sees them); the codec is then applied offline under controlled variations, so each
column isolates one cause:

- shape of the keys: ‖mean key‖ / RMS ‖k‖ (the shared offset), per-channel RMS max/median
  and the top channels (outliers);
- logit noise: std over keys of scale·q·(k̂ - k), per query (softmax ignores a shift common
  to all keys of a query, so only this spread matters), and its systematic part, the mean
  of scale·q·(k̂ - k): what moves coded keys against exact ones (the fp16 window);
- the same for each key treatment: plain, centred (μ = mean key of all the tokens), the
  Hadamard rotation against a dense random (Haar) one, three ways of setting the stored
  scale ρ (‖x‖, the norm-corrected ‖x‖/‖c‖, the projection-unbiased ‖x‖²/⟨x, Πᵀc⟩),
  per-channel scales s (centred RMS^0.5, RMS^1, the q-aware (RMS_k/RMS_q)^0.5), the 4
  loudest channels kept exact, and the cache's default (μ and s^0.5 from the first
  STATS_TOKENS keys only);
- attention output error (relative L2) with keys only, values only, and keys coded with
  the newest W keys exact (the window).

Writes a markdown report (and JSON) next to --out.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_lm_turbo import codecs, patch  # noqa: E402
from mlx_lm_turbo.codecs import layer_seed  # noqa: E402
from mlx_lm_turbo.key_statistics import STATS_TOKENS, key_statistics  # noqa: E402
from mlx_lm_turbo.codebooks import lloyd_max, quantize  # noqa: E402
from mlx_lm_turbo.eval import load_model, wikitext_windows  # noqa: E402
from mlx_lm_turbo.ratequant import CalibrationCache  # noqa: E402


def capture(model, tokens: mx.array) -> list:
    """[(q, k, v)] per layer, fp32, from one forward pass over ``tokens``."""
    patch.apply()
    caches = patch._originals["make_prompt_cache"](model)
    caches = [CalibrationCache() for _ in caches]
    mx.eval(model(tokens[None], cache=caches))
    return [(c.calibration_queries[0].astype(mx.float32), c.keys[:, :, :c.offset].astype(mx.float32),
             c.values[:, :, :c.offset].astype(mx.float32)) for c in caches]


def haar(dim: int, seed: int) -> mx.array:
    rng = np.random.default_rng([seed, dim, 0x48])
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return mx.array((q * np.sign(np.diag(r))[None, :]).astype(np.float32))


def code(x: mx.array, bits: int, seed: int, rotation: str = "hadamard",
         scale: str = "corrected") -> mx.array:
    """x̂ for one treatment of the MSE codec: the rotation and the stored scale vary."""
    d = x.shape[-1]
    codec = codecs.make("turboquant_mse", bits, d, seed)
    c, b, _ = lloyd_max("sphere", bits, d)
    c, b = mx.array(c), mx.array(b)
    norm = mx.sqrt((x * x).sum(-1, keepdims=True))
    unit = x / mx.maximum(norm, 1e-30)
    if rotation == "hadamard":
        fwd, inv = codec.rotation.forward, codec.rotation.inverse
    else:
        m = haar(d, seed)
        fwd, inv = (lambda y: y @ m.T), (lambda y: y @ m)
    y = fwd(unit)
    cy = c[quantize(y, b, bits)]
    r = inv(cy)                       # unit reconstruction Πᵀc, ‖r‖ ≈ √(1 - D)
    if scale == "plain":
        rho = norm
    elif scale == "corrected":        # what the codec stores: x̂ has x's norm
        rho = norm / mx.sqrt((r * r).sum(-1, keepdims=True))
    else:                             # "unbiased": x̂'s projection on x equals x
        rho = norm / mx.maximum((r * unit).sum(-1, keepdims=True), 1e-6)
    return (rho.astype(mx.float16).astype(mx.float32)) * r


def logit_stats(q: mx.array, k: mx.array, kh: mx.array, scale: float) -> tuple:
    """(spread, shift): mean over queries of the std over keys of scale·q·(k̂ - k), and of
    its mean over keys (GQA: each query head reads its KV head)."""
    rep = q.shape[1] // k.shape[1]
    e = mx.repeat(kh - k, rep, axis=1)
    d = scale * (q @ e.swapaxes(-1, -2))          # (1, H, Lq, T); causal ignored: all past
    L, T = q.shape[2], k.shape[2]
    pos = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]
    n = pos.sum(-1)
    mean = mx.where(pos, d, 0).sum(-1) / n
    var = mx.where(pos, (d - mean[..., None]) ** 2, 0).sum(-1) / n
    return float(mx.sqrt(var).mean()), float(mx.abs(mean).mean())


def attn(q, k, v, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    L, T = q.shape[2], k.shape[2]
    mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def windowed_attn(q, k, kh, v, scale, window):
    """Keys i-W < j ≤ i exact, older ones coded (the fp16 window's rule)."""
    rep = q.shape[1] // k.shape[1]
    k, kh, v = (mx.repeat(a, rep, axis=1) for a in (k, kh, v))
    L, T = q.shape[2], k.shape[2]
    qp, kp = mx.arange(T - L, T)[:, None], mx.arange(T)[None]
    near = (qp - kp < window) & (kp <= qp)
    s = scale * mx.where(near[None, None], q @ k.swapaxes(-1, -2), q @ kh.swapaxes(-1, -2))
    s = mx.where(kp <= qp, s, -mx.inf)
    return mx.softmax(s, axis=-1) @ v


def rel(a, b) -> float:
    return float(mx.sqrt(((a - b) ** 2).sum() / (b * b).sum()))


def key_shape(k: mx.array) -> dict:
    mu = k.mean(axis=2, keepdims=True)
    rms = mx.sqrt((k * k).sum(-1).mean())
    ch = mx.sqrt((k * k).mean(axis=2))[0]        # (heads, d)
    ch_np = np.array(ch)
    ratio = ch_np / np.median(ch_np, axis=-1, keepdims=True)
    cen = k - mu
    cen_ch = np.array(mx.sqrt((cen * cen).mean(axis=2))[0])
    cen_ratio = cen_ch / np.median(cen_ch, axis=-1, keepdims=True)
    return {"offset_share": float(mx.sqrt((mu * mu).sum(-1)).mean() / rms),
            "rms_norm": float(rms), "max_abs": float(mx.abs(k).max()),
            "chan_ratio": float(ratio.max()), "chan_ratio_centred": float(cen_ratio.max()),
            "top_channels": sorted({int(i) for i in np.argsort(-ratio.max(0))[:3]}),
            "n_over_10x": int((ratio > 10).any(0).sum())}


def treatments(bits: int):
    """(name, centre, rotation, scale) rows of the logit table; centre "s<α>" also divides
    every channel by its centred RMS^α before coding (k/s, with q·s: exact for attention),
    "x<m>" keeps the m channels of largest centred RMS exact."""
    return [("plain", False, "hadamard", "corrected"),
            ("plain ρ=‖x‖", False, "hadamard", "plain"),
            ("plain ρ unbiased", False, "hadamard", "unbiased"),
            ("plain Haar", False, "haar", "corrected"),
            ("centred", True, "hadamard", "corrected"),
            ("centred Haar", True, "haar", "corrected"),
            ("centred ρ unbiased", True, "hadamard", "unbiased"),
            ("centred s^0.5", "s0.5", "hadamard", "corrected"),
            ("centred s^1", "s1", "hadamard", "corrected"),
            ("centred s q-aware", "sq", "hadamard", "corrected"),
            ("centred 4 exact ch", "x4", "hadamard", "corrected"),
            ("default", "default", "hadamard", "corrected")]


def treated(q, k, mu, centre, bits, seed, rot, sc):
    """k̂ for one treatment (see ``treatments``)."""
    if not centre:
        return code(k, bits, seed, rot, sc)
    if centre == "default":   # the cache's own: statistics of the first STATS_TOKENS keys
        s, m = (a.astype(mx.float32) for a in key_statistics(k[:, :, :STATS_TOKENS], True, True))
        return (code(k / s - m, bits, seed, rot, sc) + m) * s
    x = k - mu
    rms = mx.sqrt((x * x).mean(axis=2, keepdims=True))           # (1, h, 1, d)
    if centre is True:
        return code(x, bits, seed, rot, sc) + mu
    if centre[0] == "s":
        if centre == "sq":   # s² = rms_k / rms_q, the minimiser of E(q·e)² for isotropic e
            rep = q.shape[1] // k.shape[1]
            qr = mx.sqrt((q * q).reshape(1, k.shape[1], rep, -1, q.shape[-1])
                         .mean(axis=(2, 3)))[:, :, None]
            s = mx.sqrt(rms / mx.maximum(qr, 1e-6))
        else:
            s = rms ** float(centre[1:])
        s = s / mx.exp(mx.log(s).mean(-1, keepdims=True))
        return code(x / s, bits, seed, rot, sc) * s + mu
    m = int(centre[1:])
    order = mx.argsort(-rms, axis=-1)[..., :m]
    keep = mx.zeros(rms.shape).astype(mx.bool_)
    keep = mx.put_along_axis(keep, order, mx.array(True), axis=-1)
    xh = code(mx.where(keep, 0, x), bits, seed, rot, sc)
    return mx.where(keep, x, xh) + mu


def diagnose_layer(i: int, q, k, v, bits_list, n_queries: int, window: int, seed: int) -> dict:
    q = q[:, :, -n_queries:]
    scale = 1 / math.sqrt(q.shape[-1])
    mu = k.mean(axis=2, keepdims=True)
    ref = attn(q, k, v, scale)
    row = {"layer": i, **key_shape(k), "bits": {}}
    ks = layer_seed(seed, i, False)
    for b in bits_list:
        r = {}
        for name, centre, rot, sc in treatments(b):
            kh = treated(q, k, mu, centre, b, ks, rot, sc)
            spread, shift = logit_stats(q, k, kh, scale)
            r[name] = {"spread": spread, "shift": shift,
                       "out_k": rel(attn(q, kh, v, scale), ref)}
            if name in ("plain", "centred", "centred ρ unbiased", "default"):
                r[name]["out_k_window"] = rel(windowed_attn(q, k, kh, v, scale, window), ref)
        vh = code(v, b, layer_seed(seed, i, True))
        r["values"] = {"out_v": rel(attn(q, k, vh, scale), ref)}
        row["bits"][b] = r
    return row


def report(rows: list, bits_list: list, window: int, model: str, tokens: int) -> str:
    out = [f"# Key diagnosis: {Path(model).name}", "",
           f"{tokens} WikiText-2 tokens, one fp32 pass; the last queries against all their "
           "past keys. spread = mean over queries of the std over keys of scale·q·(k̂-k) "
           "(logits); shift = mean |mean over keys| of it (what the window exposes); out = "
           f"relative L2 error of the attention output; W = exact window of {window}.", "",
           "## Key shape", "",
           "| layer | ‖μ‖/RMS‖k‖ | RMS ‖k‖ | max |k| | chan RMS max/median | centred | >10x | top channels |",
           "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['layer']} | {r['offset_share']:.2f} | {r['rms_norm']:.1f} | "
                   f"{r['max_abs']:.0f} | {r['chan_ratio']:.0f} | {r['chan_ratio_centred']:.0f} | "
                   f"{r['n_over_10x']} | {r['top_channels']} |")
    names = [t[0] for t in treatments(4)]
    for b in bits_list:
        out += ["", f"## {b}-bit keys: logit spread / shift, output error", "",
                "| layer | " + " | ".join(names) + " | out K | out K+W | out K centred | "
                "out K centred+W | out K centred unbiased+W | out K default | "
                "out K default+W | out V |",
                "|---:|" + "---:|" * (len(names) + 8)]
        for r in rows:
            t = r["bits"][b]
            cells = [f"{t[n]['spread']:.2f}/{t[n]['shift']:.2f}" for n in names]
            cells += [f"{t['plain']['out_k']:.3f}", f"{t['plain']['out_k_window']:.3f}",
                      f"{t['centred']['out_k']:.3f}", f"{t['centred']['out_k_window']:.3f}",
                      f"{t['centred ρ unbiased']['out_k_window']:.3f}",
                      f"{t['default']['out_k']:.3f}", f"{t['default']['out_k_window']:.3f}",
                      f"{t['values']['out_v']:.3f}"]
            out.append(f"| {r['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True, help="a folder holding wikitext2_test.raw")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--queries", type=int, default=128, help="last queries scored per layer")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--layers", default="", help="comma list (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/diagnose_keys.md")
    a = p.parse_args(argv)
    model, tok = load_model(a.model)
    tokens = wikitext_windows(tok, a.data_dir, 1, a.tokens)[0]
    layers = capture(model, tokens)
    pick = [int(x) for x in a.layers.split(",")] if a.layers else range(len(layers))
    bits_list = [int(x) for x in a.bits.split(",")]
    rows = []
    for i in pick:
        q, k, v = layers[i]
        rows.append(diagnose_layer(i, q, k, v, bits_list, a.queries, a.window, a.seed))
        print(f"layer {i} done", file=sys.stderr, flush=True)
    text = report(rows, bits_list, a.window, a.model, a.tokens)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
