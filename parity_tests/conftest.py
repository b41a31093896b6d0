from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
LLM_CASES = sorted(p.name for p in DATA.iterdir() if (p / "params.npz").is_file()
                   and (p / "vectors.npz").is_file() and p.name != "seg_vae")


@pytest.fixture(params=LLM_CASES)
def case_dir(request) -> Path:
    return DATA / request.param
