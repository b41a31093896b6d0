from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
LLM_CASES = sorted(p.name for p in DATA.iterdir() if (p / "params.npz").is_file()
                   and (p / "vectors.npz").is_file() and p.name != "seg_vae")
# Cases at real sequence lengths (1024 / 4096 image tokens) take seconds each: every stage is
# checked on them, while loader and CLI behaviour is checked on the short cases.
SHORT_LLM_CASES = [c for c in LLM_CASES if "_long_" not in c]


@pytest.fixture(params=LLM_CASES)
def case_dir(request) -> Path:
    return DATA / request.param


@pytest.fixture(params=SHORT_LLM_CASES)
def short_case_dir(request) -> Path:
    return DATA / request.param
