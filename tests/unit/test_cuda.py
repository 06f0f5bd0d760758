"""What only a GPU can show (marked `cuda`: skipped, with the reason, on machines without one).
`make gpu-check` runs the same kernels inside whole training runs and reports the figures."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from coatnet_scale.distributed.device import bind_device
from coatnet_scale.memory import device_memory_metrics
from coatnet_scale.models import layers
from coatnet_scale.models.layers import BatchNorm2d, RelPosAttention, init_module_

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", [14, 7])  # CoAtNet's S3 and S4 grids at 224 px
def test_attention_bias_gradient_on_the_memory_efficient_kernel(dtype, side, monkeypatch) -> None:
    torch.manual_seed(0)
    attn = RelPosAttention(128, 128, 32, (side, side)).cuda()
    for module in attn.modules():
        init_module_(module)
    reference = RelPosAttention(128, 128, 32, (side, side)).cuda()
    reference.load_state_dict(attn.state_dict())
    attn.to(dtype)
    x = torch.randn(8, side, side, 128, device="cuda")
    w = torch.randn(8, side, side, 128, device="cuda")
    sdpa, kernels = torch.nn.functional.scaled_dot_product_attention, []

    def recording(*args, **kwargs):
        y = sdpa(*args, **kwargs)
        kernels.append(type(y.grad_fn).__name__)
        return y

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    out = attn(x.to(dtype))
    (out.float() * w).sum().backward()
    assert kernels == ["ScaledDotProductEfficientAttentionBackward0"]
    monkeypatch.setattr(layers, "BIAS_GRAD_KERNELS", [SDPBackend.MATH])  # fp32 math reference
    (reference(x) * w).sum().backward()
    grad, expected = attn.rel_pos.table.grad.float(), reference.rel_pos.table.grad
    assert grad.abs().sum() > 0
    assert ((grad - expected).norm() / expected.norm()).item() < 0.05


def test_batchnorm_takes_bf16_activations_with_fp32_statistics_on_cuda() -> None:
    norm = BatchNorm2d(16).cuda().to(torch.bfloat16).train()
    y = norm(torch.randn(4, 16, 8, 8, device="cuda", dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and norm.running_mean.dtype == torch.float32
    y.float().sum().backward()


def test_binding_makes_the_ranks_gpu_current_and_memory_is_read_there() -> None:
    last = torch.cuda.device_count() - 1
    binding = bind_device(last, torch.cuda.device_count(), "cuda")
    assert torch.cuda.current_device() == last and binding.device == torch.device("cuda", last)
    torch.ones(1024, 1024, device=binding.device)
    metrics = device_memory_metrics(binding.device)
    assert metrics["memory_mb"] >= 4 and metrics["memory_free_mb"] > 0
