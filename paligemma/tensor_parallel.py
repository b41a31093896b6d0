"""Tensor parallelism: the Gemma decoder split over N processes with torch.distributed.

    torchrun --nproc-per-node 4 -m paligemma.tensor_parallel caption cat.jpg --model pg2-28b-448 \\
        --device cuda
    torchrun --nproc-per-node 2 -m paligemma.tensor_parallel ask cat.jpg -q "what is it" --model DIR

Any `paligemma` task command runs this way (rank 0 prints; the others stay quiet). Backend:
NCCL on CUDA devices (rank r takes cuda:LOCAL_RANK), gloo on CPU.

The split (written out rather than through DTensor so that every rank keeps the project's
float32-math layers, kernels and KV cache):
- attention: query heads split into N contiguous groups (q_proj rows). Key/value heads: split
  with the query heads when num_kv_heads is a multiple of N; else the N / num_kv_heads ranks
  whose query heads read one kv head each keep that head (MQA: all ranks) and gather the q of
  all its query heads, so that every rank attends with whole kv groups, as one process does.
  A rank holds only the kv heads it uses.
- MLP: gate/up rows (columns of the GEMM) split.
- o_proj and down_proj: split by output features (rank r holds weight rows [r D/N, (r+1) D/N));
  the input (attention heads, MLP columns) is all-gathered, each rank computes its D/N outputs
  from the whole input, and the outputs are all-gathered.
- vocabulary-parallel embedding: rank r holds rows [r V/N, (r+1) V/N) of the tied table (zero
  padded up to a multiple of N); a lookup is a masked local lookup plus an all-reduce, the
  logits a local GEMM plus an all-gather.
- replicated: norms, the SigLIP encoder and the projector (0.4B parameters in the official
  models, < 2% of 28B).

Loading: each rank reads only its slices from the converted safetensors checkpoint
(`safe_open(...).get_slice`), never the full tensors; peak memory is the rank's shard.

Numerics: every output element is computed whole by one rank, with the dot product and the
matmul shapes of one process (the row counts that pick the decode kernel or a GEMM, the query
heads per kv head in attention), so the logits equal one process's at the same number of
threads per process: bitwise on all 8 gold cases at N = 2 and on pg2_tiny at N = 4 (tests:
greedy tokens identical, logits within 1e-5). Elementwise ops must split alike too: PyTorch
runs the last (n mod 32) elements of a tensor through its scalar code, whose tanh-GELU rounds
differently, so mlp_dim / N should be a multiple of 32, as in every official model up to N = 8
(mha_f16_27b_scaling_tiny at N = 4 has 40 columns per rank: 1.1e-5).

Megatron's row-parallel o_proj / down_proj (each rank's partial sums, then an all-reduce)
rounds each rank's partial dot product first: a different float32 summation, which grew to
7e-6..6.2e-5 in the logits of those cases (|logits| up to 26); reducing in float64 changes
nothing at N = 2 (the float32 sum of two floats is already correctly rounded). Attention with
fewer query heads per kv head than one process runs other MKL kernels (one row instead of two
per decode step: 5.7e-5 on pg2_bf16_noprefix_tiny).

The cost is communication: per token and layer each rank receives (N-1)/N (H head_dim + 2 D +
mlp_dim) floats in 4 all-gathers (+ the q gather where ranks share kv heads), where Megatron's
2 all-reduces move about 4 (N-1)/N D: 1.7x for PaliGemma 2 3B (2.2x at N = 8) and 10B, 2.7x
for PaliGemma 1 and 28B, and twice the collectives per layer. Weights per rank are the same.

One process itself differs between thread counts: MKL splits the K sum of tall, narrow GEMMs
over threads (o_proj of pg1_long_1k_tiny: 6.1e-5 in the logits between 1 and 2 threads;
MKL_CBWR=AUTO,STRICT removes it), oneDNN's convolution too (7e-6, pg2_long_4k_tiny); ranks with
fewer output columns do not always take the same split, so compare at 1 thread per process.

All ranks compute the same logits, so greedy and seeded sampling pick the same tokens on every
rank (unseeded sampling is given a seed broadcast from rank 0).
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
        if cfg.width % n:
            problems.append(f"width {cfg.width}")
        if problems:
            raise ValueError(f"cannot split the decoder over {n} processes: {n} does not divide "
                             + ", ".join(problems))

    @property
    def heads(self) -> tuple[int, int]:
        """Query heads this rank projects (q_proj rows)."""
        per = self.cfg.num_heads // self.world
        return self.rank * per, (self.rank + 1) * per

    @property
    def kv_heads(self) -> tuple[int, int]:
        """kv heads read by this rank's query heads (query head n reads n // groups)."""
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        first, last = self.heads
        return first // groups, (last - 1) // groups + 1

    @property
    def sharing(self) -> int:
        """Ranks that hold each kv head: 1 when the kv heads are split, else N / num_kv_heads."""
        return max(1, self.world // self.cfg.num_kv_heads)

    @property
    def attn_heads(self) -> tuple[int, int]:
        """Query heads this rank attends with: every query head of its kv heads (its own heads
        when the kv heads are split; when ranks share a kv head, they gather the others' q)."""
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        first, last = self.kv_heads
        return first * groups, last * groups

    @property
    def mlp(self) -> tuple[int, int]:
        per = self.cfg.mlp_dim // self.world
        return self.rank * per, (self.rank + 1) * per

    @property
    def width(self) -> tuple[int, int]:
        """Output features of o_proj and down_proj."""
        per = self.cfg.width // self.world
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
            "num_heads": size(self.attn_heads), "num_kv_heads": size(self.kv_heads),
            "mlp_dim": size(self.mlp), "vocab_size": size(self.vocab),
        })
        object.__setattr__(local, "_query_scale", self.cfg.query_scale)
        return local

    def slice_of(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of a decoder tensor in the full checkpoint; None: replicated."""
        hd = self.cfg.head_dim
        part = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        rows = {"q_proj": self.heads, "k_proj": self.kv_heads, "v_proj": self.kv_heads,
                "gate_proj": self.mlp, "up_proj": self.mlp, "o_proj": self.width,
                "down_proj": self.width, "embedder": self.vocab}
        if not name.startswith("decoder.") or part not in rows:
            return None
        start, stop = rows[part]
        unit = hd if part in ("q_proj", "k_proj", "v_proj") else 1
        return 0, start * unit, stop * unit


def gather_features(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """[..., F] on each rank -> [..., world / stride * F]: the features of ranks 0, stride,
    2 stride... side by side, on every rank (stride > 1 skips ranks holding copies)."""
    world = dist.get_world_size()
    if stride == world:  # every rank holds the one copy (MQA attention output)
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts[::stride], -1)


class GatheredLinear(Linear):
    """o_proj / down_proj: the input features arrive split over the ranks (their attention
    heads or MLP columns; `stride` ranks hold each copy); this rank holds output features
    [r D/N, (r+1) D/N), i.e. rows of the weight. The input is gathered, the rank computes its
    output features with whole dot products, exactly as one process does, and those are
    gathered."""

    def __init__(self, in_features: int, out_features: int, stride: int = 1):
        super().__init__(in_features, out_features, bias=False)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K * stride / N] -> [..., D]."""
        return gather_features(super().forward(gather_features(x, self.stride)))


class SharedKVQuery(Linear):
    """q_proj when ranks share a kv head: each projects its H / N query heads, then every
    rank keeps the query heads of its kv head (`keep`, features of the gathered q), so that its
    attention runs one process's shapes: all G query heads of a kv head in one matmul."""

    def __init__(self, in_features: int, out_features: int, keep: tuple[int, int]):
        super().__init__(in_features, out_features, bias=False)
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., G * head_dim]."""
        return gather_features(super().forward(x))[..., self.keep[0] : self.keep[1]]


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
        return gather_features(super().attend(x))[..., : self.vocab_size]


def shard_model(config: PaliGemmaConfig, plan: Plan) -> PaliGemmaModel:
    """The rank's model on the meta device: local heads / MLP columns / output features /
    vocabulary rows, with the gathering and vocabulary-parallel layers in place.
    `model.config` is the full one."""
    local = plan.local_config()
    with torch.device("meta"):
        model = PaliGemmaModel(dataclasses.replace(config, text=local))
        decoder = model.decoder
        decoder.embedder = VocabParallelEmbedding(local.vocab_size, local.width, plan.vocab[0],
                                                  config.text.vocab_size)
        hd, width = local.head_dim, plan.width[1] - plan.width[0]
        queries = (plan.heads[1] - plan.heads[0]) * hd
        keep = (plan.attn_heads[0] * hd, plan.attn_heads[1] * hd)
        for layer in decoder.layers:
            if plan.sharing > 1:
                layer.attn.q_proj = SharedKVQuery(local.width, queries, keep)
            layer.attn.o_proj = GatheredLinear(config.text.num_heads * hd, width, plan.sharing)
            layer.mlp.down_proj = GatheredLinear(config.text.mlp_dim, width)
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
    code = main()
    # torch 2.13's gloo backend sometimes aborts in interpreter teardown after the group is
    # destroyed ("terminate called without an active exception"), turning a finished command
    # into a crash; its output is complete, so flush it and leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
