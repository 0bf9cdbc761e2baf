"""NPU kernels trace: a patched tiny model compiles with ``fullgraph=True`` under the stand-in, fwd+bwd.

Every stand-in op has a fake kernel and the fused MoE reads nothing on the host, so Dynamo captures the whole
model in one graph (``aot_eager`` runs the captured graph and its backward with the ops' CPU kernels).
"""

import pytest
import torch

import engine
from engine.testing import tiny_models
from engine.testing.torch_npu_standin import calls
from tests.parity import assert_close_grads, loss_and_grads

FAMILY = "qwen3_moe"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_model_compiles_fullgraph_and_matches_eager(npu_standin, dtype):
    torch._dynamo.reset()
    model = tiny_models.build(FAMILY, dtype=dtype)
    batch = tiny_models.sample_batch(model)
    with engine.apply(model, spec=FAMILY, device="npu", verbose=False) as handle:
        assert "fused_moe" in {p.entry for p in handle.report.patched}
        eager_loss, eager_grads = loss_and_grads(model, batch)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        calls.clear()
        loss, grads = loss_and_grads(compiled, batch)
        grads = {name.removeprefix("_orig_mod."): g for name, g in grads.items()}
        ops = {"npu_rms_norm", "npu_rotary_mul", "npu_swiglu", "npu_grouped_matmul", "npu_rms_norm_backward"}
        if dtype == torch.bfloat16:
            ops |= {"npu_moe_token_permute", "npu_moe_token_unpermute"}
        assert ops <= set(calls), f"not run by the compiled graph: {ops - set(calls)}"
    torch._dynamo.reset()
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss, eager_loss, rtol=rtol, atol=0)
    assert_close_grads(eager_grads, grads, rtol=rtol)
