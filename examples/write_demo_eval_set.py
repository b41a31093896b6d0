"""Writes the demo model's held-out evaluation set: the 300 scenes its model card is scored on
(`paligemma.demo.scenes.held_out`, the ones examples/train_demo_model.py scores), as PNGs and
one JSONL per task in the project's format ({"id", "image", "prefix", "suffix"}):

    .venv/bin/python examples/write_demo_eval_set.py --out out/demo_eval
    paligemma-convert paligemma/demo/model/paligemma-demo.npz \\
        --config paligemma/demo/model/config.json -o out/demo_eval/model
    cp paligemma/demo/model/tokenizer.model out/demo_eval/model/
    paligemma eval caption --model out/demo_eval/model --data out/demo_eval/caption.jsonl \\
        --max-new-tokens 24 -o out/demo_eval/caption.json      # exact_match 96.33%
    paligemma eval vqa ... --data out/demo_eval/vqa.jsonl ...   # accuracy 100%
    paligemma eval detect ... --data out/demo_eval/detect.jsonl ...   # miou 0.8305

`caption.jsonl`: "caption en" per scene; `vqa.jsonl`: "how many shapes are there" per scene and
"what color is the <kind>" per shape; `detect.jsonl`: "detect <kind>" per shape (suffix: the
true box as <loc> tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from paligemma.demo import scenes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    p.add_argument("--scenes", type=int, default=300, help="held-out scenes (default: 300, "
                   "the model card's)")
    args = p.parse_args()
    files = [args.out / f"{task}.jsonl" for task in scenes.EVAL_TASKS]
    taken = [f for f in files if f.exists()]
    if taken:
        raise SystemExit(f"error: {taken[0]} exists; choose another --out")
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    held_out = scenes.held_out(args.scenes)
    for i, scene in enumerate(held_out):
        scene.image.save(args.out / "images" / f"scene{i:03d}.png")
    for path, (task, records) in zip(files, scenes.eval_records(held_out).items(), strict=True):
        lines = [json.dumps({"id": f"{i:03d}-{n}", "image": f"images/scene{i:03d}.png",
                             "prefix": prefix, "suffix": suffix})
                 for n, (i, prefix, suffix) in enumerate(records)]
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path} ({len(lines)} {task} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
