"""`paligemma serve` throughput and latency: 1 / 4 / 16 concurrent clients against sequential
requests, side by side in one run.

Two servers (`python -m paligemma serve`, subprocesses on 127.0.0.1; --max-batch 1 and 16)
get the same N chat completions (demo scenes, "caption en" or a question, greedy, max_tokens
16) over HTTP, in each configuration, in alternating rounds:

  sequential        --max-batch 1, one client, one request after another (the baseline)
  batched, c        --max-batch 16, c clients each sending its share back to back
  unbatched, 16     --max-batch 1, 16 clients: the same load without continuous batching

and reports requests/s, generated tokens/s, p50 / p95 latency (send -> full answer) and the
ratios to the sequential run. Every configuration must return the same texts as the
sequential one (checked). The machine (CPU model and flags from /proc/cpuinfo, load average)
is recorded with the figures.

    python benchmarks/serve_benchmark.py [--model DIR] [--requests 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.record import JsonReport, add_json_arguments, machine  # noqa: E402
from paligemma.demo import scenes  # noqa: E402

PROMPTS = ["caption en", "caption en", "answer en how many shapes are there", "detect star"]


def requests_for(n: int, max_tokens: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    bodies = []
    for i in range(n):
        buffer = io.BytesIO()
        scenes.draw_scene(random.Random(i), 224).image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        bodies.append({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": rng.choice(PROMPTS)}]}], "max_tokens": max_tokens})
    return bodies


class Server:
    def __init__(self, max_batch: int, model: str | None, threads: int):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        cmd = [sys.executable, "-m", "paligemma", "serve", "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-queue", "512", "--log-level", "warning"]
        if model:
            cmd += ["--model", model]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                httpx.get(f"{self.url}/health", timeout=1)
                return
            except httpx.TransportError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def run(server: Server, bodies: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    """Sends every body once from `clients` threads; returns timings and the texts."""
    latencies: list[float] = [0.0] * len(bodies)
    texts: list[str] = [""] * len(bodies)
    tokens: list[int] = [0] * len(bodies)

    def client(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            for i in range(worker, len(bodies), clients):
                start = time.perf_counter()
                response = http.post("/v1/chat/completions", json=bodies[i])
                latencies[i] = time.perf_counter() - start
                response.raise_for_status()
                body = response.json()
                texts[i] = body["choices"][0]["message"]["content"]
                tokens[i] = body["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    return {"requests_per_s": round(len(bodies) / wall, 2),
            "tokens_per_s": round(sum(tokens) / wall, 1), "latencies": latencies,
            "texts": texts}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="checkpoint (default: the demo model)")
    p.add_argument("--requests", type=int, default=48, help="requests per configuration")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="runs of every configuration, "
                   "alternating (the table gives medians)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server "
                   "(OMP_NUM_THREADS; default 1: on a shared 2-core machine a second thread "
                   "spin-waits for a busy core)")
    add_json_arguments(p)
    args = p.parse_args()
    json_report = JsonReport(p, args)
    bodies = requests_for(args.requests, args.max_tokens)
    configs = [("sequential", 1, 1), ("batched, 1 client", 16, 1),
               ("batched, 4 clients", 16, 4), ("batched, 16 clients", 16, 16),
               ("unbatched, 16 clients", 1, 16)]
    load_before = os.getloadavg()[0]
    servers = {b: Server(b, args.model, args.threads) for b in (1, 16)}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in configs}
    try:
        for server in servers.values():
            run(server, bodies[:4], 4)  # warm-up: kernels built, caches grown
        for r in range(args.rounds):  # configurations alternate: load drifts hit all alike
            for name, max_batch, clients in configs:
                rounds[name].append(run(servers[max_batch], bodies, clients))
                print(f"  round {r + 1}, {name}: {rounds[name][-1]['requests_per_s']} req/s",
                      file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.close()
    results = []
    for name, max_batch, clients in configs:
        runs = rounds[name]
        latencies = sorted(x for run_ in runs for x in run_["latencies"])
        results.append({
            "config": name, "max_batch": max_batch, "clients": clients,
            "requests": len(bodies), "rounds": len(runs),
            "requests_per_s": statistics.median(x["requests_per_s"] for x in runs),
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[round(0.95 * (len(latencies) - 1))], 3),
            "requests_per_s_each_round": [x["requests_per_s"] for x in runs],
            "texts": runs[0]["texts"],
            "same_texts_every_round": all(x["texts"] == runs[0]["texts"] for x in runs)})
    base = results[0]
    info = machine()
    print(f"\n{info['cpu']}, {info['cores']} cores ({' '.join(info['flags'])}); torch "
          f"{info['torch']} {info['isa']}, server threads {args.threads}; load average "
          f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{args.requests} chat completions per configuration and round, {args.rounds} rounds, "
          f"max_tokens {args.max_tokens}, greedy; req/s and tok/s: median of the rounds; "
          "latency (send -> full answer): percentiles over all rounds\n")
    print(f"{'configuration':<24}{'req/s':>8}{'tok/s':>8}{'p50 s':>8}{'p95 s':>8}"
          f"{'x req/s':>9}{'same texts':>12}")
    for r in results:
        same = r["texts"] == base["texts"] and r["same_texts_every_round"]
        r["same_texts_as_sequential"] = same
        print(f"{r['config']:<24}{r['requests_per_s']:>8}{r['tokens_per_s']:>8}"
              f"{r['p50_s']:>8}{r['p95_s']:>8}"
              f"{r['requests_per_s'] / base['requests_per_s']:>9.2f}{str(same):>12}")
    json_report.save({"machine": info, "server_threads": args.threads,
                      "load_average": [load_before, os.getloadavg()[0]],
                      "results": [{k: v for k, v in r.items() if k != "texts"} for r in results]})
    return 0 if all(r["same_texts_as_sequential"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
