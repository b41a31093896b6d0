"""The converter on the gold checkpoints: output format, loading, round trips, streaming."""

import argparse
import ast
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import paligemma.formats.mapping
import paligemma.formats.open
from convert.cli import main, parse_size
from paligemma.config import PaliGemmaConfig
from paligemma.formats import load_official, load_pretrained, save_pretrained, vae
from paligemma.formats.npz import OfficialNpz
from paligemma.formats.ours import load_state_dict

ROOT = Path(__file__).parents[1]
GOLD = ROOT / "parity_tests" / "data"
CONFIGS = Path(__file__).parent / "data" / "configs"
CASES = ["pg1_tiny", "pg1_tiny_bf16", "pg2_tiny"]


def run(*args: str | Path) -> int:
    """The command line, in-process and quiet."""
    return main([*map(str, args), "-q"])


def convert_case(case: str, out: Path, *flags: str) -> None:
    """Converts a gold case's params.npz to our format."""
    assert (
        run(GOLD / case / "params.npz", "--config", CONFIGS / f"{case}.json", "-o", out, *flags)
        == 0
    )


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def assert_npz_bit_exact(a: Path, b: Path) -> None:
    left, right = npz_arrays(a), npz_arrays(b)
    assert sorted(left) == sorted(right)
    for key, array in left.items():
        assert (array.dtype, array.shape) == (right[key].dtype, right[key].shape), key
        assert array.tobytes() == right[key].tobytes(), key


@pytest.mark.parametrize("case", CASES)
def test_npz_to_ours_to_npz_is_bit_exact(case, tmp_path):
    convert_case(case, tmp_path / "ours")
    assert run(tmp_path / "ours", "--to", "npz", "-o", tmp_path / "back.npz") == 0
    assert_npz_bit_exact(GOLD / case / "params.npz", tmp_path / "back.npz")


def test_round_trip_through_float32_restores_the_original_bf16(tmp_path):
    convert_case("pg1_tiny_bf16", tmp_path / "ours", "--dtype", "float32")
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert run(tmp_path / "ours", "-o", tmp_path / "back.npz") == 0
    assert_npz_bit_exact(GOLD / "pg1_tiny_bf16" / "params.npz", tmp_path / "back.npz")
    assert npz_arrays(tmp_path / "back.npz")["params/llm/final_norm/scale"].dtype == np.dtype("V2")


@pytest.mark.parametrize("case", ["pg1_tiny_bf16", "pg2_tiny"])
def test_converted_directory_loads_the_same_weights_as_the_official_loader(case, tmp_path):
    convert_case(case, tmp_path / "ours")
    config = PaliGemmaConfig.load(CONFIGS / f"{case}.json")
    expected = load_official(GOLD / case / "params.npz", config, dtype=torch.float32).state_dict()
    model = load_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert model.config == load_official(GOLD / case / "params.npz", config).config
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_config_keeps_the_source_dtype_whatever_dtype_is_written(tmp_path):
    # param_dtype decides big_vision's bf16-rounded sqrt(width) embedding scale.
    convert_case("pg1_tiny_bf16", tmp_path / "ours", "--dtype", "float32")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "paligemma"
    assert config["text"]["param_dtype"] == "bfloat16"
    assert load_pretrained(tmp_path / "ours").config.text.embed_scale == 9.8125


def test_dtype_flag_rounds_to_the_requested_dtype(tmp_path):
    convert_case("pg2_tiny", tmp_path / "ours", "--dtype", "bfloat16")
    config = PaliGemmaConfig.load(CONFIGS / "pg2_tiny.json")
    reference = load_official(GOLD / "pg2_tiny" / "params.npz", config).state_dict()
    for name, tensor in load_state_dict(tmp_path / "ours").items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_sharded_output_has_an_index_and_loads_like_a_single_file(tmp_path):
    convert_case("pg2_tiny", tmp_path / "single")
    convert_case("pg2_tiny", tmp_path / "sharded", "--max-shard-size", "300KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    single = load_state_dict(tmp_path / "single")
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in single.values())
    for shard in shards:  # no shard passes the limit unless one tensor alone does
        with safe_open(tmp_path / "sharded" / shard, "pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 300_000 or len(sizes) == 1
    sharded = load_state_dict(tmp_path / "sharded")
    assert sorted(sharded) == sorted(single)
    assert all(torch.equal(sharded[k], single[k]) for k in single)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_load_pretrained_maps_the_file_instead_of_copying_it(tmp_path):
    convert_case("pg2_tiny", tmp_path / "ours")
    model = load_pretrained(tmp_path / "ours")
    path = str((tmp_path / "ours" / "model.safetensors").resolve())
    mapped = []  # address ranges where the weights file is memory-mapped
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(path):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            mapped.append((start, end))
    assert mapped
    for name, p in model.named_parameters():
        assert any(s <= p.data_ptr() < e for s, e in mapped), name


def test_save_pretrained_round_trips_a_model(tmp_path):
    config = PaliGemmaConfig.load(CONFIGS / "pg2_tiny.json")
    model = load_official(GOLD / "pg2_tiny" / "params.npz", config)
    save_pretrained(model, tmp_path / "saved", max_shard_size=500_000)
    loaded = load_pretrained(tmp_path / "saved")
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_manifest_records_sources_sizes_hashes_and_version(tmp_path):
    convert_case("pg1_tiny", tmp_path / "ours", "--hash")
    manifest = json.loads((tmp_path / "ours" / "manifest.json").read_text())
    src = GOLD / "pg1_tiny" / "params.npz"
    assert manifest["sources"] == [
        {
            "file": "params.npz",
            "bytes": src.stat().st_size,
            "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        }
    ]
    assert manifest["converter_version"] == "0.1.0"
    assert manifest["official_arrays"]["llm/layers/mlp/linear"] == {
        "shape": [3, 128, 96],
        "dtype": "float32",
    }


def test_checkpoint_split_in_parts_converts_like_one_file(tmp_path):
    arrays = npz_arrays(GOLD / "pg2_tiny" / "params.npz")
    np.savez(tmp_path / "part1.npz", **{k: v for k, v in arrays.items() if "/img/" in k})
    np.savez(tmp_path / "part2.npz", **{k: v for k, v in arrays.items() if "/llm/" in k})
    convert_case("pg2_tiny", tmp_path / "single")
    parts = [tmp_path / "part1.npz", tmp_path / "part2.npz"]
    assert run(*parts, "--config", CONFIGS / "pg2_tiny.json", "-o", tmp_path / "parts") == 0
    a, b = load_state_dict(tmp_path / "single"), load_state_dict(tmp_path / "parts")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_byte_split_parts_are_read_without_joining_them(tmp_path):
    # How Google ships the 28B checkpoints: `*.npz.part*`, meant to be joined with `cat`.
    data = (GOLD / "pg2_tiny" / "params.npz").read_bytes()
    cuts = [0, 1000, len(data) // 2, len(data)]
    parts = [tmp_path / f"params.npz.part{i}" for i in range(3)]
    for part, start, end in zip(parts, cuts[:-1], cuts[1:], strict=True):
        part.write_bytes(data[start:end])
    convert_case("pg2_tiny", tmp_path / "single")
    assert run(*parts, "--config", CONFIGS / "pg2_tiny.json", "-o", tmp_path / "split") == 0
    a, b = load_state_dict(tmp_path / "single"), load_state_dict(tmp_path / "split")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "split" / "manifest.json").read_text())
    assert [s["file"] for s in manifest["sources"]] == [p.name for p in parts]


def test_keys_without_the_params_prefix_are_accepted(tmp_path):
    arrays = npz_arrays(GOLD / "pg1_tiny" / "params.npz")
    np.savez(tmp_path / "bare.npz", **{k.removeprefix("params/"): v for k, v in arrays.items()})
    config = CONFIGS / "pg1_tiny.json"
    assert run(tmp_path / "bare.npz", "--config", config, "-o", tmp_path / "ours") == 0
    assert run(tmp_path / "ours", "-o", tmp_path / "back.npz") == 0
    assert_npz_bit_exact(GOLD / "pg1_tiny" / "params.npz", tmp_path / "back.npz")


def test_stacked_arrays_are_read_one_layer_at_a_time(tmp_path, monkeypatch):
    biggest = {}
    iter_rows = OfficialNpz.iter_rows

    def spy(self, key, max_rows=1):
        for chunk in iter_rows(self, key, max_rows):
            biggest[key] = max(biggest.get(key, 0), chunk.shape[0])
            yield chunk

    monkeypatch.setattr(OfficialNpz, "iter_rows", spy)
    monkeypatch.setattr(OfficialNpz, "read", lambda *a: pytest.fail("read a whole array"))
    convert_case("pg2_tiny", tmp_path / "ours")
    assert biggest["llm/layers/mlp/gating_einsum"] == 1
    assert biggest["img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == 1


def test_variant_is_detected_from_the_shapes(tmp_path, monkeypatch):
    # Registry of tiny variants, so that detection runs on the gold files.
    tiny = {c: PaliGemmaConfig.load(CONFIGS / f"{c}.json") for c in ("pg1_tiny", "pg2_tiny")}
    monkeypatch.setattr(paligemma.formats.mapping, "VARIANTS", tiny)
    monkeypatch.setattr(paligemma.formats.open, "VARIANTS", tiny)
    assert run(GOLD / "pg2_tiny" / "params.npz", "-o", tmp_path / "a") == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["name"] == "pg2_tiny"
    assert run(GOLD / "pg1_tiny" / "params.npz", "--variant", "pg1_tiny", "-o", tmp_path / "b") == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["name"] == "pg1_tiny"


def test_vae_keeps_its_keys_and_round_trips(tmp_path):
    src = GOLD / "seg_vae" / "params.npz"  # detected: no --variant
    assert run(src, "-o", tmp_path / "vae") == 0
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config == {"model_type": "vae-oid", "num_embeddings": 128, "embedding_dim": 512}
    official = npz_arrays(src)
    state = load_state_dict(tmp_path / "vae")
    assert sorted(state) == sorted(official)
    for key, array in official.items():
        assert torch.equal(state[key], torch.from_numpy(array)), key
    assert run(tmp_path / "vae", "-o", tmp_path / "back.npz") == 0
    assert_npz_bit_exact(src, tmp_path / "back.npz")


def test_vae_layout_table_matches_the_official_layout():
    layout = json.loads((GOLD / "official_layouts.json").read_text())["vae_oid"]
    assert vae.SHAPES == {k: tuple(shape) for k, shape in layout.items()}


def test_written_npz_members_are_stored_uncompressed(tmp_path):
    convert_case("pg1_tiny_bf16", tmp_path / "ours")
    assert run(tmp_path / "ours", "-o", tmp_path / "back.npz") == 0
    with zipfile.ZipFile(tmp_path / "back.npz") as zf:
        infos = zf.infolist()
    assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
    assert all(i.filename.startswith("params/") for i in infos)


def test_force_replaces_a_previous_conversion(tmp_path):
    convert_case("pg1_tiny", tmp_path / "ours")
    (tmp_path / "ours" / "stale.txt").write_text("old")
    convert_case("pg1_tiny", tmp_path / "ours", "--force")
    assert not (tmp_path / "ours" / "stale.txt").exists()
    assert (tmp_path / "ours" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]  # no temporaries left


def test_python_dash_m_convert_and_the_console_script_are_wired(tmp_path):
    assert 'paligemma-convert = "convert.cli:main"' in (ROOT / "pyproject.toml").read_text()
    argv = [sys.executable, "-m", "convert", str(GOLD / "seg_vae" / "params.npz")]
    result = subprocess.run(
        [*argv, "-o", str(tmp_path / "vae"), "-q"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "vae" / "model.safetensors").is_file()


def test_shard_sizes_parse_like_hugging_face_sizes():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1024") == 1024
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size("5 parsecs")


def test_the_library_never_imports_the_converter_command():
    # Imports run one way: convert/ is a command over paligemma.formats, never the reverse.
    for path in (ROOT / "paligemma").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n == "convert" or n.startswith("convert.") for n in names), path
