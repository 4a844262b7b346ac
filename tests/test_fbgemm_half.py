"""FbgemmTBE with half-precision weights (fbgemm's ``weights_precision``) on fbgemm-gpu-cpu's CPU op: what it
supports, measured, and what ``fbgemm.unsupported`` refuses so the runtime falls back.

fbgemm rounds with its own random bits and arithmetic, so its rows are held to the same op in fp32 per step,
not to ``sharding.rounding.round_to`` bit for bit: within one fp16 ulp of the result plus one of the update.
The second term is measured, not assumed: the fp16 op's SGD and Adagrad round the update to fp16 before
adding it (a row the update nearly zeroes was off by ~180 ulp of its new value, and never by more than
half an ulp of the result plus half an ulp of the update); its row-wise Adagrad stays within half an ulp.
"""
from __future__ import annotations

import pytest
import torch

from sharding.kernels import fbgemm
from sharding.optim import OptimSpec
from sharding.rounding import ulp
from tests.tbe_reference import OPTIM, check_sub_ulp_updates_survive, make_batch, train_step
from tests.tolerance import assert_within

pytestmark = pytest.mark.skipif(not fbgemm.available(), reason="fbgemm_gpu is not importable")

FB_SHAPES = [(40, 8), (60, 16)]  # widths fbgemm takes (multiples of 4)
CPU = torch.device("cpu")


def fbgemm_maker(kind: str = "sgd"):
    """A FbgemmTBE of (dtype, stochastic_rounding[, shapes, optim]), as tbe_reference's checks build kernels."""
    def make(dtype, stochastic, shapes=FB_SHAPES, optim=OptimSpec(kind, **OPTIM)):
        return fbgemm.FbgemmTBE(shapes, optim, CPU, dtype=dtype, stochastic_rounding=stochastic)
    return make


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad"])
def test_fp16_rows_stay_within_an_ulp_of_the_fp32_op(kind):
    """Each step from the same (fp16) weights: the fp16 op's rows within an fp16 ulp of the fp32 op's rows
    plus one of their update (module docstring)."""
    make = fbgemm_maker(kind)
    half, full = make(torch.float16, False), make(torch.float32, False)
    assert all(w.dtype == torch.float16 for w in half.table_weights())
    for step in range(3):
        with torch.no_grad():
            for w32, w16 in zip(full.table_weights(), half.table_weights()):
                w32.copy_(w16.float())
        before = [w.float() for w in half.table_weights()]
        batch = make_batch(seed=20 + step, weighted=True, shapes=FB_SHAPES)
        out16, out32 = train_step(half, *batch), train_step(full, *batch)
        assert out16.dtype == torch.float32
        torch.testing.assert_close(out16, out32)
        for t, (w16, w32, b) in enumerate(zip(half.table_weights(), full.table_weights(), before)):
            tol = ulp(w32, torch.float16) + ulp(w32 - b, torch.float16)
            assert_within(w16.float(), w32, tol, f"step {step} table {t}")


def test_unsupported_refuses_what_the_cpu_op_lacks():
    shapes, optim = [(100, 8)], OptimSpec("sgd", 0.1)
    assert fbgemm.unsupported(shapes, optim, CPU) is None
    assert fbgemm.unsupported(shapes, optim, CPU, dtype=torch.float16, stochastic_rounding=False) is None
    assert "no bf16 weights" in fbgemm.unsupported(shapes, optim, CPU, dtype=torch.bfloat16)
    assert "ignores stochastic_rounding" in fbgemm.unsupported(shapes, optim, CPU, dtype=torch.float16)
    assert "not torch.float64" in fbgemm.unsupported(shapes, optim, CPU, dtype=torch.float64)
    with pytest.raises(ValueError, match="no bf16 weights"):
        fbgemm.FbgemmTBE(shapes, optim, CPU, dtype=torch.bfloat16)


def test_the_measurements_behind_unsupported(monkeypatch):
    """With ``unsupported`` out of the way, the CPU op loses every sub-ulp update even when asked to round
    stochastically, and cannot pool bf16 rows. Should a later fbgemm fix either, this fails: lift the refusal."""
    monkeypatch.setattr(fbgemm, "unsupported", lambda *args, **kwargs: None)
    with pytest.raises(AssertionError, match=r"True: 0\.0\b"):
        check_sub_ulp_updates_survive(fbgemm_maker(), torch.float16)
    tbe = fbgemm_maker()(torch.bfloat16, True)
    with pytest.raises(NotImplementedError, match="BFloat16"):
        tbe(torch.tensor([1, 2]), torch.tensor([0, 1, 2]))
