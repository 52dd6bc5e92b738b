"""Load test of ``mlx_lm.server`` with compressed KV caches (loopback only, bounded).

For each configuration it starts its own server on 127.0.0.1 (a free port), sends N
completion requests from C concurrent clients, checks every answer, samples the server's
RSS, stops the server, then goes on to the next configuration:

  turbo    python -m mlx_lm_turbo server --kv-method M --kv-bits B   (batched, packed codes)
  fp16     python -m mlx_lm server                 (mlx-lm's KVCache, model dtype; batched)
  affine4  python -m mlx_lm server --kv-bits 4 --quantized-kv-start 0
                                                   (mlx-lm's QuantizedKVCache; one at a time)

Every prompt asks the model to continue a counting sequence that starts at its own number
(``"503, 504, 505,"``), so each answer is checkable and unique: an answer that continues
another request's sequence is counted as mixed up. Half of the requests stream (SSE).

    python scripts/load_test.py                       # 64 requests, 16 clients, 16 tokens
    python scripts/load_test.py --requests 16 --clients 4 --max-tokens 16 \\
        --out reports/server_load                     # writes .md and .json

The model defaults to a float32 copy (weights dequantized once, cached under the temp dir)
of ``models/smollm2-135m`` (``python -m mlx_lm_turbo.smollm2 models/smollm2-135m``): mlx-lm's quantized matmul is slow on a
CPU and does not get faster with batch size; ``--quantized-weights`` serves the folder as is.
The helpers (free_port, Server, post, stream, fp32_model) are used by tests/test_server.py.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "smollm2-135m"


# ---------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fp32_model(src: Path = DEFAULT_MODEL, cache_dir: Optional[Path] = None) -> Path:
    """A float32 copy of ``src`` with its weights dequantized (made once, then reused)."""
    src = Path(src).resolve()
    dst = Path(cache_dir or tempfile.gettempdir()) / "mlx_lm_turbo_models" / f"{src.name}-f32"
    if (dst / "config.json").exists():
        return dst
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model, save_model

    model, _ = load(str(src))
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, model)
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy(f, tmp / f.name)
    try:
        os.replace(tmp, dst)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Server:
    """A server subprocess on 127.0.0.1; ``with Server(args) as s: s.port``.

    ``module`` is ``mlx_lm_turbo`` (patched) or ``mlx_lm`` (stock, the start-up hook off).
    Its stdout+stderr go to ``log_path``; ``log()`` reads them."""

    def __init__(self, model: Path, extra: list, module: str = "mlx_lm_turbo",
                 log_path: Optional[Path] = None, ready_timeout: float = 120.0):
        self.port = free_port()
        self.model = model
        self.cmd = [sys.executable, "-m", module, "server", "--model", str(model),
                    "--host", "127.0.0.1", "--port", str(self.port), *extra]
        self.module = module
        self.log_path = Path(log_path or tempfile.mktemp(prefix="mlx_lm_server_", suffix=".log"))
        self.ready_timeout = ready_timeout
        self.proc = None

    def __enter__(self) -> "Server":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.setdefault("HF_HUB_OFFLINE", "1")
        if self.module != "mlx_lm_turbo":
            env["MLX_LM_TURBO_DISABLE"] = "1"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=str(ROOT))
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = get(self.port, "/health", timeout=2)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise RuntimeError(f"server not ready in {self.ready_timeout}s:\n{self.log()}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self._log.close()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid


def get(port: int, path: str, timeout: float = 10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def post_raw(port: int, path: str, body: bytes, timeout: float = 300):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def post(port: int, path: str, payload: dict, timeout: float = 300):
    """Non-streaming request: (status, parsed JSON or raw bytes)."""
    status, data = post_raw(port, path, json.dumps(payload).encode(), timeout)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data


def stream(port: int, path: str, payload: dict, timeout: float = 300):
    """Streaming request: (status, text, usage, seconds to the first chunk)."""
    payload = dict(payload, stream=True, stream_options={"include_usage": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    first = None
    text, usage = [], None
    try:
        conn.request("POST", path, body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return r.status, r.read().decode(errors="replace"), None, None
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("text")
                if piece is None:
                    piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter() - t0
                    text.append(piece)
        return r.status, "".join(text), usage, first
    finally:
        conn.close()


def completion_text(resp: dict) -> str:
    choice = resp["choices"][0]
    if "text" in choice:
        return choice["text"]
    return choice["message"]["content"] or ""


def completion_ids(resp: dict) -> list:
    return [t["id"] for t in resp["choices"][0].get("logprobs", {}).get("content", [])]


# ---------------------------------------------------------------- load test
CONFIGS = {
    "turbo": ("mlx_lm_turbo", None),          # flags come from --kv-method / --kv-bits
    "fp16": ("mlx_lm", []),
    "affine4": ("mlx_lm", ["--kv-bits", "4", "--kv-group-size", "64", "--quantized-kv-start", "0"]),
}


LABELS = {"turbo": "turbo (ours, batched)", "fp16": "fp16 (mlx-lm KVCache, batched)",
          "affine4": "mlx-lm --kv-bits 4 (one at a time)"}


def counting_prompt(i: int) -> tuple[str, int]:
    """Request i counts from its own start; the answer must continue with ``expected``."""
    start = 100 * (i + 1) + i % 7
    k = 3 + i % 6                       # 3..8 numbers: prompts of different lengths
    nums = list(range(start, start + k))
    return ", ".join(map(str, nums)) + ",", start + k


def first_number(text: str) -> Optional[int]:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def run_config(name: str, model: Path, args) -> dict:
    module, extra = CONFIGS[name]
    if extra is None:
        extra = ["--kv-method", args.kv_method, "--kv-bits", str(args.kv_bits)]
    extra = extra + ["--decode-concurrency", str(args.clients),
                     "--prompt-concurrency", str(min(args.clients, 8))]
    log_dir = Path(tempfile.mkdtemp(prefix="load_test_"))
    result = {"config": name, "command": None, "requests": args.requests,
              "clients": args.clients, "max_tokens": args.max_tokens}
    with Server(model, extra, module=module, log_path=log_dir / f"{name}.log") as srv:
        result["command"] = " ".join(srv.cmd[1:]).replace(str(ROOT) + "/", "")
        samples = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                samples.append((time.perf_counter(), rss_bytes(srv.pid)))
                stop.wait(0.2)

        # warm-up (model load, first compile) outside the timed window
        post(srv.port, "/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 2,
                                           "temperature": 0.0})
        rss_start = rss_bytes(srv.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        prompts = [counting_prompt(i) for i in range(args.requests)]
        expected_all = {e for _, e in prompts}
        deadline = time.perf_counter() + args.time_limit

        def one(i):
            prompt, expected = prompts[i]
            payload = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0}
            if time.perf_counter() > deadline:
                return {"i": i, "status": "skipped (time limit)"}
            t0 = time.perf_counter()
            try:
                if i % 2:
                    status, text, usage, ttft = stream(srv.port, "/v1/completions", payload,
                                                       timeout=args.time_limit)
                    tokens = (usage or {}).get("completion_tokens")
                else:
                    status, resp = post(srv.port, "/v1/completions", payload,
                                        timeout=args.time_limit)
                    text = completion_text(resp) if status == 200 else str(resp)
                    tokens = resp["usage"]["completion_tokens"] if status == 200 else None
                    ttft = None
            except Exception as e:  # noqa: BLE001 — reported as a lost request
                return {"i": i, "status": f"error: {type(e).__name__}: {e}"}
            latency = time.perf_counter() - t0
            got = first_number(text)
            check = ("ok" if got == expected else
                     "mixed" if got in expected_all else "wrong")
            return {"i": i, "status": status, "latency_s": latency, "ttft_s": ttft,
                    "tokens": tokens, "check": check, "expected": expected, "got": got,
                    "stream": bool(i % 2), "text": text}

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            rows = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        log_text = srv.log()
    done = [r for r in rows if r.get("status") == 200]
    lat = sorted(r["latency_s"] for r in done)
    tokens = sum(r["tokens"] or 0 for r in done)
    batch_sizes = [int(m) for m in re.findall(r"batch of (\d+) sequences", log_text)]

    def pct(p):
        if not lat:
            return None
        return lat[min(len(lat) - 1, max(0, round(p / 100 * len(lat) + 0.5) - 1))]

    result.update({
        "completed": len(done),
        "lost": args.requests - len(done),
        "ok": sum(r["check"] == "ok" for r in done),
        "wrong": sum(r["check"] == "wrong" for r in done),
        "mixed": sum(r["check"] == "mixed" for r in done),
        "wall_s": wall,
        "p50_s": pct(50), "p95_s": pct(95),
        "mean_s": statistics.mean(lat) if lat else None,
        "ttft_p50_s": statistics.median([r["ttft_s"] for r in done if r.get("ttft_s")] or [0]),
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall else None,
        "rss_start_mib": rss_start / 2**20,
        "rss_peak_mib": max((s for _, s in samples), default=0) / 2**20,
        "rss_end_mib": (samples[-1][1] if samples else 0) / 2**20,
        "rss_samples": len(samples),
        "max_batch_logged": max(batch_sizes, default=None),
        "rows": rows,
    })
    return result


def cache_bytes(model_path: Path, kv_method: str, kv_bits: int, n: int = 256) -> list:
    """Bytes per cached token (all layers) of each cache kind for this model, measured on a
    real prefill of ``n`` tokens: what the LRU prompt cache counts (``nbytes``)."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    sys.path.insert(0, str(ROOT))
    from mlx_lm_turbo import patch
    from mlx_lm_turbo.cache import TurboConfig, TurboKVCache

    patch.apply()   # attention over packed codes (no config: caches stay mlx-lm's otherwise)
    model, tok = load(str(model_path))
    ids = (tok.encode(" ".join(str(i) for i in range(400))) * 2)[:n]
    fp = make_prompt_cache(model)
    model(mx.array([ids]), cache=fp)
    config = TurboConfig(kv_method, kv_bits)
    turbo = [TurboKVCache.from_config(config, i) for i in range(len(fp))]
    model(mx.array([ids]), cache=turbo)
    mx.eval([c.state for c in fp + turbo])

    def per_token(caches):
        return sum(c.nbytes for c in caches) / n

    native = per_token(fp)
    dtype_bytes = fp[0].keys.dtype.size
    rows = [("fp16 KVCache", native * 2 / dtype_bytes),
            (f"mlx-lm KVCache as served ({str(fp[0].keys.dtype).split('.')[-1]})", native),
            ("mlx-lm --kv-bits 4 (QuantizedKVCache, group 64)",
             per_token([c.to_quantized(64, 4) for c in fp])),
            (f"mlx-lm-turbo {config.describe()}", per_token(turbo))]
    fp16 = rows[0][1]
    return [{"cache": name, "bytes_per_token": b, "tokens_per_gib": int(2**30 // b),
             "vs_fp16": fp16 / b} for name, b in rows]


def markdown(results: list, args, command: str, memory: Optional[list] = None) -> str:
    out = ["# mlx_lm.server load test", "",
           f"Command: `{command}`", "",
           f"{args.requests} completion requests (`/v1/completions`, greedy, max_tokens "
           f"{args.max_tokens}, half streamed) from {args.clients} concurrent clients per "
           f"configuration; one server at a time on 127.0.0.1, each started by the script "
           f"(model: `{args.model_label}`). Each prompt continues its own counting sequence, "
           "so an answer is checked against its request (ok), a wrong number (wrong), or "
           "another request's number (mixed).", "",
           f"Machine: {os.cpu_count()} CPU cores, load average {args.load_before} before the "
           "run (other jobs share it, so timings are noisy); MLX CPU backend, where attention "
           "over packed codes runs the pure-MLX reference (it decodes the codes at every "
           "step), not the fused GPU kernels.", "",
           "| config | completed | lost | ok | wrong | mixed | same text as fp16 | p50 s | "
           "p95 s | tokens/s | RSS start / peak / end MiB | max batch |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["config"]: {row["i"]: row.get("text") for row in r["rows"]} for r in results}
    for r in results:
        same = "-"
        if "fp16" in base:
            same = sum(row.get("text") is not None and row.get("text") == base["fp16"].get(row["i"])
                       for row in r["rows"])
        out.append(
            f"| {LABELS.get(r['config'], r['config'])} | {r['completed']}/{r['requests']} | "
            f"{r['lost']} | {r['ok']} | {r['wrong']} | {r['mixed']} | {same} | "
            f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['rss_start_mib']:.0f} / {r['rss_peak_mib']:.0f} / {r['rss_end_mib']:.0f} | "
            f"{r['max_batch_logged'] or '-'} |")
    if memory:
        out += ["", "Prompt-cache memory: bytes per cached token (all layers), as the LRU prompt "
                "cache counts them (`nbytes`, measured on a 256-token prefill of this model), "
                "and the tokens one `--prompt-cache-bytes 1G` budget holds:", "",
                "| cache | bytes/token | tokens per GiB | vs fp16 |", "|---|---|---|---|"]
        out += [f"| {m['cache']} | {m['bytes_per_token']:.0f} | {m['tokens_per_gib']:,} | "
                f"{m['vs_fp16']:.2f}x |" for m in memory]
    out += ["", "Server commands:", ""]
    out += [f"- {r['config']}: `python {r['command']}`" for r in results]
    out += ["", "Notes:", "",
            "- `max batch`: the largest batch the turbo server's BatchTurboKVCache logged "
            "(`mlx-lm-turbo: decoding a batch of N sequences`, `... merge -> batch of N "
            "sequences`); the stock servers do "
            "not log it. mlx-lm serves `--kv-bits` requests one at a time.",
            "- tokens/s: completion tokens of all requests / wall time of the run. Latency: "
            "request sent to last byte, client side.",
            "- fp16 is mlx-lm's default KVCache, which stores the model's dtype (float32 "
            "here: the CPU runs the model in float32).",
            "- wrong: a well-formed answer with the wrong number (the compressed cache's "
            "quality, not a mix-up: the rows in the JSON hold every answer); same text as "
            "fp16: answers identical to the fp16 server's for the same prompt.",
            "- RSS includes the model (float32 weights, ~540 MB) and the LRU prompt cache "
            "(10 entries by default); it is sampled every 0.2 s during the run."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--configs", default="turbo,fp16,affine4",
                   help="comma-separated, from: " + ", ".join(CONFIGS))
    p.add_argument("--kv-method", default="turboquant_mse")
    p.add_argument("--kv-bits", type=int, default=4)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--quantized-weights", action="store_true",
                   help="serve --model as is (default: a dequantized float32 copy)")
    p.add_argument("--time-limit", type=float, default=600,
                   help="seconds per configuration; later requests are skipped (and lost)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    if args.requests > 1024 or args.clients > 64:
        p.error("bounded: at most 1024 requests and 64 clients")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for n in names:
        if n not in CONFIGS:
            p.error(f"unknown config {n!r}")
    model = args.model if args.quantized_weights else fp32_model(args.model)
    args.model_label = (str(args.model) if args.quantized_weights
                        else f"{args.model.name}, weights dequantized to float32")
    command = "python scripts/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.load_before = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    results = []
    for n in names:
        print(f"[load_test] {n} ...", file=sys.stderr, flush=True)
        r = run_config(n, model, args)
        print(f"[load_test] {n}: {r['completed']}/{r['requests']} done, ok {r['ok']}, "
              f"p50 {r['p50_s']:.2f}s p95 {r['p95_s']:.2f}s, {r['tokens_per_s']:.1f} tok/s, "
              f"RSS peak {r['rss_peak_mib']:.0f} MiB, max batch {r['max_batch_logged']}",
              file=sys.stderr, flush=True)
        results.append(r)
    memory = cache_bytes(model, args.kv_method, args.kv_bits)
    md = markdown(results, args, command, memory)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"command": command, "model": args.model_label, "cpu_count": os.cpu_count(),
             "load_average_before": args.load_before, "results": results,
             "prompt_cache_bytes_per_token": memory}, indent=1))
    bad = sum(r["lost"] + r["mixed"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
