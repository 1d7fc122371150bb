"""`lowbit tune` on a machine without CUDA: a clear refusal, exit status 2."""

import pytest
import torch

from lowbit.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: tune would run")
def test_tune_without_cuda_refuses(capsys):
    assert main(["tune", "--model", "smollm2", "--m", "1,16"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "defaults apply" in err

