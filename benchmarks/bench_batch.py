"""Batch throughput: one-by-one `caption` against static batches and continuous batching, one run.

On the shipped demo model (converted to a temporary folder), over synthetic scenes, greedy:

1. captions, images/s: one image per call (what `paligemma caption a.png b.png ...
   --batch-size 1` and a loop over `PaliGemma.caption` do), static batches of 8 and 32 (the
   task commands' `--batch-size`: a batch runs until its longest caption ends), and the
   continuous-batching scheduler (`paligemma batch`'s engine) with 1, 8 and 32 rows.
2. mixed prompts: the same images asked "how many shapes" (1 token), "detect circle" (~5) and
   "caption en" (~11), static batches against continuous batching at the same batch size.
3. mixed output lengths: budgets of 4 to 64 new tokens on a random-weight model of the demo's
   shape (it never emits eos, so each row runs to its budget): static batches run every row
   to the batch's largest budget, continuous batching retires each row at its own.

Every configuration runs the same items in the same process, in turn, twice (the best of the
two counts). Time is CPU seconds of the process with one torch thread: on a shared machine (this
project's has 2 cores for 7 engineers, load average above 10) wall time varies several-fold
between identical runs, CPU time much less. Ratios are printed against one-by-one / static. The
CPU model, flags, threads and load average are recorded. "admit >= k": the scheduler's
min_prefill (new rows join once k rows are free, one prefill for several rows).

    python benchmarks/bench_batch.py [--images 48] [--json out.json]

`--variant pg1-3b-224`: random weights of an official variant's shape instead (bf16 storage,
float32 activations as the model always computes, seed 0, built in memory: ~6 GB for 3B), with
the demo tokenizer padded by unused pieces to the official 257152 ids (prompt ids are the
demo's). Random weights never emit eos, so every row runs to its budget; sections 1 (captions
of `--tokens` new tokens) and 3 (`--budgets`) only. A 3B-224 prefill (256 image + ~6 text
positions) costs ~12-14 CPU s per image and batching cannot share it, so the counts are small
(benchmarks/results/batch_fullsize_run1.json and run1b, ~12 and ~8 CPU minutes):

    python benchmarks/bench_batch.py --variant pg1-3b-224 --images 8 --one-by-one 4 \\
        --one-batch --continuous none --tokens 8 --static 8 --budgets 2,4,8,16,32 \\
        --budget-images 16 --budget-sizes 8 --repeats 1 --json out.json
    python benchmarks/bench_batch.py --variant pg1-3b-224 --images 32 --one-by-one 2 \\
        --one-batch --continuous none --tokens 8 --static 32 --budget-sizes none --repeats 1

`--one-batch`: each batch size runs over exactly one batch of captions (equal budgets: every
batch of a static run costs the same). The JSON file is rewritten after each configuration, so
an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_inference import random_tensors  # puts the repository on sys.path: benchmarks.*

from benchmarks.record import JsonReport, add_json_arguments, machine
from paligemma import PaliGemma
from paligemma.config import PALIGEMMA_VOCAB_SIZE, VARIANTS, PaliGemmaConfig
from paligemma.demo import scenes
from paligemma.demo.command import DEMO_MODEL
from paligemma.image import preprocess, to_rgb_array
from paligemma.model import PaliGemmaModel
from paligemma.scheduler import Request, Scheduler
from paligemma.tokenizer import GEMMA_VOCAB_SIZE, LOC_PIECES, SEG_PIECES, Tokenizer

DEMO = DEMO_MODEL
MIXED = [("answer en how many shapes are there", 8), ("detect circle", 12), ("caption en", 24),
         ("caption en", 64)]  # (prompt, max_new_tokens): 1, ~6, ~11 and up to 64 tokens


def load_demo(folder: Path) -> PaliGemma:
    from paligemma.formats import open_checkpoint, write_ours

    write_ours(open_checkpoint([DEMO / "paligemma-demo.npz"], config_file=DEMO / "config.json"),
               folder, quiet=True)
    shutil.copyfile(DEMO / "tokenizer.model", folder / "tokenizer.model")
    return PaliGemma.from_pretrained(folder)


def official_size_tokenizer(path: Path) -> Tokenizer:
    """The demo tokenizer with unused pieces inserted before <loc0000>, so that it has the
    official 257152 ids with <loc>/<seg> at their official ids (the demo's text pieces keep
    theirs): prompts tokenize as on the demo model, for a model of an official vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf (the [ref] extra)

    proto = pb.ModelProto.FromString((DEMO / "tokenizer.model").read_bytes())
    special = set(LOC_PIECES + SEG_PIECES)
    pieces = [p for p in proto.pieces if p.piece not in special]
    tail = [p for p in proto.pieces if p.piece in special]
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    unused = pb.ModelProto.SentencePiece.UNUSED
    for i in range(len(pieces), GEMMA_VOCAB_SIZE):
        proto.pieces.add(piece=f"<unused_bench{i}>", score=0.0, type=unused)
    proto.pieces.extend(tail)
    path.write_bytes(proto.SerializeToString())
    tokenizer = Tokenizer(path)  # checks the <loc>/<seg> ids of a 257152-piece model
    assert tokenizer.vocab_size == PALIGEMMA_VOCAB_SIZE
    return tokenizer


def random_model(config: PaliGemmaConfig, seed: int = 0) -> PaliGemmaModel:
    """bench_inference's random weights (N(0, 1/fan_in) matrices) in bf16 storage, built in
    memory one tensor at a time (peak: the model plus one float32 piece of rows)."""
    with torch.device("meta"):
        model = PaliGemmaModel(config)
    state = {}
    for name, shape, pieces in random_tensors(config, seed):
        tensor, row = torch.empty(shape, dtype=torch.bfloat16), 0
        for piece in pieces:
            tensor[row:row + len(piece)] = piece
            row += len(piece)
        state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def timed(fn, repeats: int = 2) -> tuple[float, object]:
    """Best of `repeats` runs, in CPU seconds of this process (see the module docstring)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
    return best, out


def static(pg: PaliGemma, requests: list[Request], size: int) -> list[list[int]]:
    """Batches of `size` in input order, each run to its longest row (pg.generate)."""
    tokens = []
    for start in range(0, len(requests), size):
        chunk = requests[start:start + size]
        budget = max(r.max_new_tokens for r in chunk)
        tokens += [r.tokens for r in pg.generate(torch.stack([r.image for r in chunk]),
                                                 [r.prompt for r in chunk],
                                                 max_new_tokens=budget)]
    return tokens


def continuous(pg: PaliGemma, requests: list[Request], size: int, min_prefill: int = 1) -> dict:
    return {h.id: h.tokens
            for h in Scheduler(pg, size, min_prefill=min_prefill).run(requests)}


def ints(text: str) -> list[int]:
    return [] if text == "none" else [int(v) for v in text.split(",")]


def agreement(outputs: list[list[int]], ref: list[list[int]]) -> str:
    """'k/n': rows of `outputs` whose tokens equal `ref`'s (over the rows both have)."""
    n = min(len(outputs), len(ref))
    return f"{sum(a == b for a, b in zip(outputs[:n], ref[:n], strict=True))}/{n}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS),
                        help="random weights of this official variant (default: the demo model)")
    parser.add_argument("--images", type=int, default=48, help="captions per configuration")
    parser.add_argument("--one-by-one", type=int, help="captions of the one-by-one row "
                        "(default --images)")
    parser.add_argument("--one-batch", action="store_true",
                        help="each batch size captions exactly one batch (see the docstring)")
    parser.add_argument("--tokens", type=int, default=24, help="caption budget, new tokens")
    parser.add_argument("--static", type=ints, default=[8, 32], help="static batch sizes")
    parser.add_argument("--continuous", default="1:1,8:1,8:2,32:1,32:8",
                        help="continuous-batching rows:min_prefill pairs, or none")
    parser.add_argument("--budgets", type=ints, default=[4, 8, 16, 32, 64],
                        help="section 3's per-row budgets, in turn")
    parser.add_argument("--budget-images", type=int, help="section 3's items (default --images)")
    parser.add_argument("--budget-sizes", type=ints, default=[8, 32],
                        help="section 3's batch sizes")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration (best)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU seconds are then a stable measure "
                        "of work on a shared machine)")
    add_json_arguments(parser)
    args = parser.parse_args()
    json_report = JsonReport(parser, args)
    torch.set_num_threads(args.threads)
    continuous_configs = [tuple(ints(pair.replace(":", ","))) for pair in
                          ([] if args.continuous == "none" else args.continuous.split(","))]
    folder = Path(tempfile.mkdtemp())
    try:
        if args.variant:
            torch.manual_seed(0)
            start = time.perf_counter()
            pg = PaliGemma(random_model(VARIANTS[args.variant]),
                           official_size_tokenizer(folder / "tokenizer.model"))
            print(f"built random {args.variant} in {time.perf_counter() - start:.0f} s")
        else:
            pg = load_demo(folder / "model")
    finally:
        shutil.rmtree(folder)
    params = sum(t.numel() for t in pg.model.state_dict().values())
    model_name = (f"{args.variant}, random weights, bf16 storage ({params / 1e9:.2f}B parameters)"
                  if args.variant else "demo (2.1M parameters)")
    rng = random.Random(0)
    n = max([args.images, args.one_by_one or 0, args.budget_images or 0])
    images = [scenes.draw_scene(rng, 112).image for _ in range(n)]
    pixels = list(preprocess([to_rgb_array(im) for im in images], pg.image_size))
    report: dict = {"machine": {**machine(), "threads": torch.get_num_threads(),
                                "load": os.getloadavg()},
                    "model": model_name, "platform": platform.platform(), "args": vars(args)}

    def save() -> None:
        report["machine"]["load_now"] = os.getloadavg()
        json_report.save(report)

    cpu = report["machine"]
    print(f"{model_name}\nCPU: {cpu['cpu']}; {cpu['isa']}; flags {' '.join(cpu['flags'])}; "
          f"{cpu['threads']} threads; load {cpu['load'][0]:.1f}\n")

    def timed_row(name: str, fn, items: int, section: dict) -> tuple[float, object]:
        seconds, out = timed(fn, args.repeats)
        section[name] = {"seconds": seconds, "images": items, "images_per_s": items / seconds}
        print(f"  {name}: {seconds:.1f} CPU s, {items} images", flush=True)
        save()
        return seconds, out

    captions = [Request(p, "caption en", max_new_tokens=args.tokens, id=i)
                for i, p in enumerate(pixels[:args.images])]
    report["captions"] = rows = {}
    print(f"1. captions (max {args.tokens} tokens, greedy), CPU seconds")
    n_one = args.one_by_one or args.images
    one, ref = timed_row("one-by-one caption", lambda: [
        pg.caption(p[None], max_new_tokens=args.tokens)[0].tokens for p in pixels[:n_one]],
        n_one, rows)
    for size in args.static:
        items = captions[:size] if args.one_batch else captions
        _, out = timed_row(f"static batches of {size}", lambda s=size, i=items: static(pg, i, s),
                           len(items), rows)
        assert args.variant or out == ref, "static batching changed a caption"
        rows[f"static batches of {size}"]["same_as_one_by_one"] = agreement(out, ref)
    for size, min_prefill in continuous_configs:
        name = f"continuous, {size} rows, admit >={min_prefill}"
        items = captions[:size] if args.one_batch else captions
        _, out = timed_row(name, lambda s=size, m=min_prefill, i=items: continuous(pg, i, s, m),
                           len(items), rows)
        out = [out[i] for i in range(len(items))]
        assert args.variant or out == ref, "continuous batching changed a caption"
        rows[name]["same_as_one_by_one"] = agreement(out, ref)
    per_one = one / n_one
    print(f"{'':<36}{'CPU s':>8}{'images':>8}{'images/CPU s':>14}{'x one-by-one':>14}"
          f"{'same':>8}")
    for name, row in rows.items():
        print(f"{name:<36}{row['seconds']:>8.2f}{row['images']:>8}{row['images_per_s']:>14.3f}"
              f"{per_one * row['images'] / row['seconds']:>14.2f}"
              f"{row.get('same_as_one_by_one', ''):>8}")
    save()  # with the last row's agreement

    if not args.variant:  # a trained model's own output lengths: the demo only
        mixed = [Request(p, MIXED[i % len(MIXED)][0], max_new_tokens=MIXED[i % len(MIXED)][1],
                         id=i) for i, p in enumerate(pixels[:args.images])]
        lengths = [len(t) for t in continuous(pg, mixed, 8).values()]
        print(f"\n2. mixed prompts: {args.images} items, prompts {[m[0] for m in MIXED]}, "
              f"budgets {[m[1] for m in MIXED]}; generated tokens min {min(lengths)}, mean "
              f"{sum(lengths) / args.images:.1f}, max {max(lengths)}")
        print(f"{'batch':<8}{'static CPU s':>14}{'continuous CPU s':>18}{'speed-up':>10}")
        report["mixed"] = {"tokens_mean": sum(lengths) / args.images,
                           "tokens_max": max(lengths)}
        for size in (8, 32):
            s_static, _ = timed(lambda size=size: static(pg, mixed, size), args.repeats)
            s_cont, _ = timed(lambda size=size: continuous(pg, mixed, size, max(1, size // 4)),
                              args.repeats)
            print(f"{size:<8}{s_static:>14.2f}{s_cont:>18.2f}{s_static / s_cont:>10.2f}")
            report["mixed"][str(size)] = {"static_s": s_static, "continuous_s": s_cont}
            save()
        # A random-weight model of the demo's shape hardly ever emits eos: every row runs to
        # its own budget, a controlled mix of output lengths.
        torch.manual_seed(0)
        rand = PaliGemma(PaliGemmaModel(pg.model.config).eval(), pg.tokenizer)
    else:
        rand = pg
    if not args.budget_sizes:
        return
    budgets = args.budgets
    n_budget = args.budget_images or args.images
    spread = [Request(p, "caption en", max_new_tokens=budgets[i % len(budgets)], id=i)
              for i, p in enumerate(pixels[:n_budget])]
    print(f"\n3. {n_budget} items, budgets {budgets} in turn (random weights: no eos)")
    report["budgets"] = {"items": n_budget, "budgets": budgets}
    for size in args.budget_sizes:
        s_static, out_static = timed(lambda size=size: static(rand, spread, size), args.repeats)
        s_cont, out = timed(lambda size=size: continuous(rand, spread, size, max(1, size // 4)),
                            args.repeats)
        lengths = [len(out[i]) for i in range(n_budget)]
        report["budgets"][str(size)] = {
            "static_s": s_static, "continuous_s": s_cont, "tokens_mean": sum(lengths) / n_budget,
            "same": agreement([out[i] for i in range(n_budget)],
                              [t[:len(out[i])] for i, t in enumerate(out_static)])}
        print(f"  batch {size}: static {s_static:.1f} CPU s, continuous (admit >= "
              f"{max(1, size // 4)}) {s_cont:.1f} CPU s, speed-up {s_static / s_cont:.2f}; "
              f"generated tokens mean {sum(lengths) / n_budget:.1f}, max {max(lengths)}; rows "
              f"equal to static's (its first tokens) {report['budgets'][str(size)]['same']}",
              flush=True)
        save()


if __name__ == "__main__":
    main()
