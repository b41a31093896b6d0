"""Tensor parallelism: the Gemma decoder split over N processes with torch.distributed.

    torchrun --nproc-per-node 4 -m paligemma.tensor_parallel caption cat.jpg --model pg2-28b-448 \\
        --device cuda
    torchrun --nproc-per-node 2 -m paligemma.tensor_parallel ask cat.jpg -q "what is it" --model DIR

Any `paligemma` task command runs this way (rank 0 prints; the others stay quiet). Backend:
NCCL on CUDA devices (rank r takes cuda:LOCAL_RANK), gloo on CPU.

The split (Megatron-style, written out rather than through DTensor so that every rank keeps the
project's float32-math layers, kernels and KV cache; `parallelize_module`'s Colwise/Rowwise
plans would shard the same dimensions):
- attention: query heads split into N contiguous groups (q_proj rows, o_proj columns, then an
  all-reduce of o_proj's partial sums). Key/value heads: split with the query heads when
  num_kv_heads is a multiple of N, else each rank keeps the one kv head its query heads read
  (MQA: all ranks; replicated); either way a rank holds only the kv heads it uses.
- MLP: gate/up rows (columns of the GEMM) and down columns split, then an all-reduce.
- vocabulary-parallel embedding: rank r holds rows [r V/N, (r+1) V/N) of the tied table (zero
  padded up to a multiple of N); a lookup is a masked local lookup plus an all-reduce, the
  logits a local GEMM plus an all-gather.
- replicated: norms, the SigLIP encoder and the projector (0.4B parameters in the official
  models, < 2% of 28B).

Loading: each rank reads only its slices from the converted safetensors checkpoint
(`safe_open(...).get_slice`), never the full tensors; peak memory is the rank's shard.

Numerics: each rank runs the same float32 math on its heads / columns; only the order in which
the all-reduce adds the N partial sums differs from one process (tests: greedy tokens identical,
logits within 1e-5 on every gold case at N = 2). All ranks compute the same logits, so greedy and
seeded sampling pick the same tokens on every rank (unseeded sampling is given a seed broadcast
from rank 0).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from .config import PaliGemmaConfig, TextConfig
from .formats.open import ConvertedSource, HFSource, Source, open_checkpoint
from .formats.ours import read_config, weight_map
from .layers import Embedding, Linear
from .model import PaliGemmaModel


@dataclasses.dataclass(frozen=True)
class ShardTextConfig(TextConfig):
    """The part of a TextConfig one rank computes (its heads, MLP columns and vocabulary rows).
    It keeps the whole model's query scale (27B's depends on num_heads), set by
    `Plan.local_config` (not a field: configs hold only their own settings)."""

    @property
    def query_scale(self) -> float:
        return self._query_scale


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which slice of each split dimension rank `rank` of `world` holds."""

    cfg: TextConfig
    rank: int
    world: int

    def __post_init__(self) -> None:
        cfg, n = self.cfg, self.world
        problems = [f"num_heads {cfg.num_heads}"] if cfg.num_heads % n else []
        if cfg.num_kv_heads % n and n % cfg.num_kv_heads:
            problems.append(f"num_kv_heads {cfg.num_kv_heads} (nor divides it)")
        if cfg.mlp_dim % n:
            problems.append(f"mlp_dim {cfg.mlp_dim}")
        if problems:
            raise ValueError(f"cannot split the decoder over {n} processes: {n} does not divide "
                             + ", ".join(problems))

    @property
    def heads(self) -> tuple[int, int]:
        per = self.cfg.num_heads // self.world
        return self.rank * per, (self.rank + 1) * per

    @property
    def kv_heads(self) -> tuple[int, int]:
        """kv heads read by this rank's query heads (query head n reads n // groups)."""
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        first, last = self.heads
        return first // groups, (last - 1) // groups + 1

    @property
    def mlp(self) -> tuple[int, int]:
        per = self.cfg.mlp_dim // self.world
        return self.rank * per, (self.rank + 1) * per

    @property
    def vocab(self) -> tuple[int, int]:
        """Rows of the (zero-padded) embedding table; may run past vocab_size on the last rank."""
        per = -(-self.cfg.vocab_size // self.world)
        return self.rank * per, (self.rank + 1) * per

    def local_config(self) -> ShardTextConfig:
        def size(span: tuple[int, int]) -> int:
            return span[1] - span[0]

        local = ShardTextConfig(**{
            **{f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(TextConfig)},
            "num_heads": size(self.heads), "num_kv_heads": size(self.kv_heads),
            "mlp_dim": size(self.mlp), "vocab_size": size(self.vocab),
        })
        object.__setattr__(local, "_query_scale", self.cfg.query_scale)
        return local

    def slice_of(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of a decoder tensor in the full checkpoint; None: replicated."""
        hd = self.cfg.head_dim
        part = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        rows = {"q_proj": self.heads, "k_proj": self.kv_heads, "v_proj": self.kv_heads,
                "gate_proj": self.mlp, "up_proj": self.mlp, "embedder": self.vocab}
        cols = {"o_proj": self.heads, "down_proj": self.mlp}
        if not name.startswith("decoder."):
            return None
        if part in rows:
            start, stop = rows[part]
            unit = hd if part in ("q_proj", "k_proj", "v_proj") else 1
            return 0, start * unit, stop * unit
        if part in cols:
            start, stop = cols[part]
            unit = hd if part == "o_proj" else 1
            return 1, start * unit, stop * unit
        return None


class RowParallelLinear(Linear):
    """A Linear whose input features are split over the ranks: the partial products are
    summed by an all-reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        dist.all_reduce(y)
        return y


class VocabParallelEmbedding(Embedding):
    """Rows [start, start + num_embeddings) of a tied embedding of `vocab_size` rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, start: int, vocab_size: int):
        super().__init__(num_embeddings, embedding_dim)
        self.start, self.vocab_size = start, vocab_size

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] -> [..., D]: each id is looked up by the rank that holds its row."""
        local = tokens - self.start
        mine = (local >= 0) & (local < self.num_embeddings)
        x = super().forward(local.clamp(0, self.num_embeddings - 1)) * mine[..., None]
        dist.all_reduce(x)
        return x

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., vocab_size], every rank with the full logits."""
        local = super().attend(x).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return torch.cat(parts, -1)[..., : self.vocab_size]


def shard_model(config: PaliGemmaConfig, plan: Plan) -> PaliGemmaModel:
    """The rank's model on the meta device: local heads / MLP columns / vocabulary rows, with
    the row-parallel and vocabulary-parallel layers in place. `model.config` is the full one."""
    local = plan.local_config()
    with torch.device("meta"):
        model = PaliGemmaModel(dataclasses.replace(config, text=local))
        decoder = model.decoder
        decoder.embedder = VocabParallelEmbedding(local.vocab_size, local.width, plan.vocab[0],
                                                  config.text.vocab_size)
        for layer in decoder.layers:
            layer.attn.o_proj = RowParallelLinear(local.num_heads * local.head_dim, local.width,
                                                  bias=False)
            layer.mlp.down_proj = RowParallelLinear(local.mlp_dim, local.width, bias=False)
    model.config = config
    return model


def load_tensor_parallel(
    checkpoint: str | Path | Source,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> PaliGemmaModel:
    """This rank's part of a converted checkpoint directory (process group already set up).

    `model.config` stays the full model's (tokenizer checks, image size); the decoder's modules
    carry the rank's `ShardTextConfig`. dtype None keeps the stored dtype.
    """
    source = checkpoint if isinstance(checkpoint, Source) else open_checkpoint(checkpoint)
    if not isinstance(source, ConvertedSource) or isinstance(source, HFSource):
        raise ValueError(f"{checkpoint}: tensor parallelism reads our converted directories "
                         "(slices of their safetensors); convert it first with "
                         "paligemma-convert")
    if source.quantization is not None:
        raise ValueError(f"{checkpoint}: tensor parallelism reads unquantized checkpoints "
                         f"(this one is {source.quantization.mode})")
    directory = source.directory
    config = PaliGemmaConfig.from_dict(read_config(directory))
    plan = Plan(config.text, dist.get_rank(), dist.get_world_size())
    model = shard_model(config, plan)
    expected = model.state_dict()
    files = weight_map(directory)
    missing = sorted(set(expected) - set(files))
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks {missing[:3]} ({len(missing)} tensors)")
    state = {}
    for name, meta in expected.items():
        with safe_open(files[name], framework="pt") as f:
            view = f.get_slice(name)
            span = plan.slice_of(name)
            if span is None:
                tensor = view[:]
            else:
                dim, lo, hi = span
                full = view.get_shape()[dim]
                tensor = view[lo:min(hi, full)] if dim == 0 else view[:, lo:min(hi, full)]
                if hi > full:  # the padded end of the vocabulary
                    tensor = torch.cat([tensor, tensor.new_zeros(hi - full, *tensor.shape[1:])])
        if tuple(tensor.shape) != tuple(meta.shape):
            raise ValueError(f"{files[name]}: {name} has shape {tuple(tensor.shape)}, this "
                             f"rank expects {tuple(meta.shape)} (checkpoint / config mismatch)")
        state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers this process holds."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


_ACTIVE = False  # set by main(): paligemma.cli loads models with load_tensor_parallel


def active() -> bool:
    return _ACTIVE


def init(device: str = "cpu") -> torch.device:
    """Joins the torchrun process group (NCCL on CUDA, gloo otherwise); returns the device
    this rank computes on."""
    if device.startswith("cuda"):
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(local)
    else:
        local = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if local.type == "cuda" else "gloo")
    return local


def shared_seed() -> int:
    """A random seed drawn on rank 0 and given to every rank (sampling must agree)."""
    seed = torch.randint(0, 2**62, (1,))
    dist.broadcast(seed, 0)
    return int(seed)


def main(argv: list[str] | None = None) -> int:
    """`torchrun ... -m paligemma.tensor_parallel <paligemma command and options>`."""
    global _ACTIVE
    from . import cli

    if "WORLD_SIZE" not in os.environ:
        print("error: launch with torchrun, e.g. torchrun --nproc-per-node 2 -m "
              "paligemma.tensor_parallel caption cat.jpg --model DIR", file=sys.stderr)
        return 2
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in cli.TASKS:
        print(f"error: tensor parallelism runs the task commands ({', '.join(cli.TASKS)}); "
              "for many images on many devices use paligemma batch --ray", file=sys.stderr)
        return 2
    _ACTIVE = True
    device = args[args.index("--device") + 1] if "--device" in args else "cpu"
    init(device)
    if int(os.environ.get("RANK", 0)) != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (one printer: rank 0)
    try:
        return cli.main(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
