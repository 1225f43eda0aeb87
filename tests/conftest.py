import pytest
import torch

from isokl_tl.models import EMBEDDED, TINY, load_model


@pytest.fixture(scope="session")
def tiny():
    torch.manual_seed(0)
    return load_model(TINY)


@pytest.fixture(scope="session")
def smol():
    return load_model(EMBEDDED)


@pytest.fixture(scope="session")
def tiny_direction(tiny):
    from isokl_tl.directions import compute_direction
    from isokl_tl.prompts import load_pairs

    return compute_direction(tiny, load_pairs()[:8], "blocks.2.hook_resid_post", "mean_diff")
