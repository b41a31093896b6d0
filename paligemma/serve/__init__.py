"""`paligemma serve`: PaliGemma over HTTP (FastAPI + uvicorn, the `[serve]` extra).

    pip install -e ".[serve]"
    paligemma serve                       # the shipped demo model on http://127.0.0.1:8000
    paligemma serve --model pg2-3b-448 --vae vae-oid --api-key "$KEY"

Open http://127.0.0.1:8000/ for the web page, /docs for the API. See `app.py` for the routes
and `engine.py` for how requests share the model.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

from ..quantize import MODES as QUANTIZE_MODES


def load_demo() -> Any:
    """The shipped demo model (paligemma/demo/model, official .npz) as a PaliGemma, no download
    and no conversion step (read straight from the official format)."""
    from ..api import PaliGemma
    from ..config import PaliGemmaConfig
    from ..demo.command import CONFIG, DEMO_MODEL, NPZ, TOKENIZER
    from ..formats import load_official
    from ..tokenizer import Tokenizer

    for name in (NPZ, TOKENIZER, CONFIG):
        if not (DEMO_MODEL / name).is_file():
            raise FileNotFoundError(f"{DEMO_MODEL / name}: the demo model file is missing (run "
                                    "from a checkout of the repository, or pass --model DIR)")
    config = PaliGemmaConfig.load(DEMO_MODEL / CONFIG)
    return PaliGemma(load_official(DEMO_MODEL / NPZ, config), Tokenizer(DEMO_MODEL / TOKENIZER))


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import ServeConfig, create_app
    except ImportError as e:
        print(f"error: paligemma serve needs the [serve] extra ({e.name} is not installed): "
              "pip install -e '.[serve]'", file=sys.stderr)
        return 2
    import numpy as np
    import torch

    from ..api import PaliGemma

    api_key = args.api_key or os.environ.get("PALIGEMMA_API_KEY") or None
    if not _is_loopback(args.host) and api_key is None:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach "
              "this address can use the model (set --api-key or PALIGEMMA_API_KEY)",
              file=sys.stderr)
    if args.model is None:
        if args.vae is not None:
            raise ValueError("--vae needs --model: the demo model was not trained to segment")
        pg = load_demo()
        model_id = pg.model.config.name or "paligemma-demo"
    else:
        pg = PaliGemma.from_pretrained(
            args.model, tokenizer=args.tokenizer, vae=args.vae,
            dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device,
            quantize=args.quantize)
        model_id = pg.model.config.name or os.path.basename(os.path.normpath(args.model))
    config = ServeConfig(
        model_id=model_id, api_key=api_key, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens, default_max_tokens=min(64, args.max_tokens),
        max_batch=args.max_batch, max_queue=args.max_queue, timeout=args.timeout,
        shutdown_timeout=args.shutdown_timeout)
    # One generation before the first client's: loads (or builds) the C++ decode kernel.
    print("warming up the model...", file=sys.stderr, flush=True)
    pg.generate(np.zeros((pg.image_size, pg.image_size, 3), np.uint8), "caption en",
                max_new_tokens=2)
    app = create_app(pg, config)
    print(f"serving {model_id} on http://{_url_host(args.host)}:{args.port}/ "
          f"(API docs at /docs; Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="HTTP API (OpenAI-compatible + detect/segment/explain) and a web page",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  paligemma serve --model pg2-3b-448 --vae vae-oid --port 8000")
    p.add_argument("--model", metavar="DIR", help="converted checkpoint directory or Hugging "
                   "Face Hub repo id (default: the shipped demo model)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="SentencePiece model (default: tokenizer.model in --model)")
    p.add_argument("--vae", metavar="PATH",
                   help="mask VAE (vae-oid.npz or its converted directory); enables /v1/segment")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast the weights (default: as stored)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="int8 / int4 weights (see `caption -h`)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on "
                   "/v1 (default: $PALIGEMMA_API_KEY, or no key)")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-batch", type=int, default=8, metavar="N",
                        help="requests decoded together (default: 8)")
    limits.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="requests admitted at once, running or waiting; more get HTTP "
                        "429 (default: 64)")
    limits.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds per request, waiting included; then HTTP 504 "
                        "(default: 120)")
    limits.add_argument("--max-tokens", type=int, default=256, metavar="N",
                        help="the most new tokens a request may ask for (default: 256)")
    limits.add_argument("--max-prompt-tokens", type=int, default=128, metavar="N",
                        help="longest task prefix in tokens (default: 128)")
    limits.add_argument("--max-image-bytes", type=int, default=8 * 2**20, metavar="N",
                        help="largest encoded image (default: 8 MiB)")
    limits.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N",
                        help="largest image in width x height (default: 4096 x 4096)")
    limits.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                        help="on Ctrl-C / SIGTERM, seconds in-flight requests get to finish "
                        "(default: 30)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)
