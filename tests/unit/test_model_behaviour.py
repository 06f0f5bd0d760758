"""Forward/backward, activation checkpointing, resolution change and the timm contract, on CPU."""

import ast
import copy
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import coatnet_scale
from coatnet_scale.models import ModelConfig, build_model, create_model, load_weights
from coatnet_scale.models.layers import (
    BatchNorm2d,
    RelPosAttention,
    RelPosBias,
    fp32_batchnorm_statistics,
    init_module_,
    relative_position_index,
    resize_rel_pos_table,
)
from coatnet_scale.plan import POLICIES

SWITCHES = [
    {},
    {"mbconv_stride": "dwconv", "mbconv_pool": "max", "attn_pool": "avg"},
    {"head": "gap_fc", "channels_last": False},
]


def small(name: str = "coatnet_debug", **kwargs) -> torch.nn.Module:
    kwargs.setdefault("image_size", 64)
    kwargs.setdefault("num_classes", 10)
    return build_model(ModelConfig(name=name, **kwargs))


def rel_tables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith("rel_pos.table")}


@pytest.mark.parametrize("name", ["coatnet_debug", "coatnet0"])
@pytest.mark.parametrize("switches", SWITCHES)
def test_forward_backward_gives_every_parameter_a_gradient(name: str, switches: dict) -> None:
    model = small(name, drop_path_rate=0.1, **switches).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, zero
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_features_and_head_follow_timm_conventions() -> None:
    model = small().eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features, 2, 2)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(features), model(x))
    assert model.get_classifier() is model.head.fc
    model.reset_classifier(42)
    assert model(x).shape == (2, 42)
    assert model.num_classes == 42 and model.cfg.num_classes == 42


def _run(model: torch.nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stages", [None, ("stem", "s1"), ("s3",)])
def test_activation_checkpointing_gives_identical_outputs_gradients_and_bn_stats(stages) -> None:
    reference = small(drop_path_rate=0.3).train()
    checkpointed = copy.deepcopy(reference)
    checkpointed.set_grad_checkpointing(True, stages)
    expected = set(stages or ("stem", "s1", "s2", "s3", "s4"))
    assert checkpointed.grad_checkpointing == expected
    x = torch.randn(4, 3, 64, 64)
    out_ref, grads_ref = _run(reference, x, seed=7)
    out_ckpt, grads_ckpt = _run(checkpointed, x, seed=7)
    assert torch.equal(out_ref, out_ckpt)
    for name, grad in grads_ref.items():
        assert torch.equal(grad, grads_ckpt[name]), name
    # Running statistics are updated once per step, not again by the recompute.
    for (name, buf), (_, buf_ckpt) in zip(
        reference.named_buffers(), checkpointed.named_buffers(), strict=True
    ):
        assert torch.equal(buf, buf_ckpt), name


@pytest.mark.parametrize("policy", list(POLICIES))
def test_compiled_model_trains_under_every_checkpointing_policy(policy: str) -> None:
    """torch.compile traces the checkpointed blocks (Dynamo refused the eager recompute context,
    a closure); gradients and BatchNorm statistics equal the eager, uncheckpointed model's.
    aot_eager here keeps it fast; the 2-rank tests run inductor through the engine."""
    reference = small(image_size=32).train()
    compiled = copy.deepcopy(reference)
    compiled.set_grad_checkpointing(True, POLICIES[policy])
    x = torch.randn(4, 3, 32, 32)
    out_ref, grads_ref = _run(reference, x, seed=7)
    out, grads = _run(torch.compile(compiled, backend="aot_eager", fullgraph=True), x, seed=7)
    torch.testing.assert_close(out, out_ref)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[f"_orig_mod.{name}"], grad, rtol=1e-4, atol=1e-6)
    for (name, buf), (_, buf_compiled) in zip(
        reference.named_buffers(), compiled.named_buffers(), strict=True
    ):
        torch.testing.assert_close(buf_compiled, buf, msg=name)  # one update, not two


def test_low_precision_parameters_get_the_rounded_fp32_initialisation() -> None:
    """ZeRO-3 builds parameters in the training dtype, ZeRO 0-2 in fp32 (then cast): both must
    start from the same weights, so the draw is made in fp32 either way."""
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(3)
        reference = torch.nn.Linear(64, 32)
        init_module_(reference)
        torch.manual_seed(3)
        low = torch.nn.Linear(64, 32).to(dtype)
        init_module_(low)
        assert torch.equal(low.weight, reference.weight.detach().to(dtype))


def test_initialisation_is_timms_for_coatnet() -> None:
    """Convolutions He fan-out per group (a depthwise 3x3 at sqrt(2/9), not 0.02: the old
    N(0, 0.02) everywhere kept CoAtNet-0 at chance for ~50 steps on the digits,
    bench/init_plateau.py), Transformer linears Xavier uniform, head and tables N(0, 0.02), and
    the same for a conv or linear built in bf16 (ZeRO-3)."""
    torch.manual_seed(0)
    model = create_model("coatnet0", image_size=224)
    block = model.stages[1][1]  # a regular MBConv block of S2
    assert block.conv_dw.groups == block.conv_dw.out_channels  # depthwise
    expected = {
        block.conv_dw.weight: math.sqrt(2 / 9),
        block.conv_expand.weight: math.sqrt(2 / block.conv_expand.out_channels),
        model.stem.conv1.weight: math.sqrt(2 / (9 * model.stem.conv1.out_channels)),
        model.head.fc.weight: 0.02,
        model.head.pre_logits[0].weight: 0.02,
    }
    attn = model.stages[2][1].attn  # S3, a 14x14 grid: 27x27 table entries per head
    fan_in, fan_out = attn.qkv.in_features, attn.qkv.out_features
    expected[attn.qkv.weight] = math.sqrt(2 / (fan_in + fan_out))  # Xavier uniform's std
    expected[attn.rel_pos.table] = 0.02
    for param, std in expected.items():
        assert param.std().item() == pytest.approx(std, rel=0.1)
        assert param.mean().abs().item() < 0.1 * std
    assert float(attn.qkv.weight.abs().max()) <= math.sqrt(6 / (fan_in + fan_out))
    assert all(
        float(b.abs().max()) == 0
        for n, b in model.named_parameters()
        if n.endswith("bias") and "norm" not in n
    )
    conv = torch.nn.Conv2d(64, 64, 3, groups=64, bias=False).to(torch.bfloat16)
    init_module_(conv)
    assert conv.weight.float().std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.1)


def test_compiled_bf16_model_keeps_fp32_batchnorm_statistics() -> None:
    """After a bf16 cast (DeepSpeed's, or zero.Init's), the statistics go back to fp32 once,
    outside forward, so the compiled graph has no dtype-changing buffer update (fullgraph)."""
    model = small(image_size=32).train().to(torch.bfloat16)
    assert model.stem.norm1.running_mean.dtype == torch.bfloat16
    fp32_batchnorm_statistics(model)
    assert model.stem.norm1.running_mean.dtype == torch.float32
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and model.stem.norm1.running_mean.dtype == torch.float32
    assert int(model.stem.norm1.num_batches_tracked) == 1


def test_attention_uses_a_kernel_that_returns_the_bias_gradient(monkeypatch) -> None:
    """The SDPA call runs with only the memory-efficient and math kernels allowed (never cuDNN
    or flash, which return no gradient for the bias), and the relative-position tables get the
    gradient of the plain formula softmax(q k^T / sqrt(d) + B) v."""
    torch.manual_seed(0)
    attn = RelPosAttention(16, 32, head_dim=8, grid=(4, 4)).train()
    for module in attn.modules():
        init_module_(module)
    allowed: list[dict[str, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        allowed.append(
            {
                "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            }
        )
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    x = torch.randn(2, 4, 4, 16)
    weights = torch.randn(2, 4, 4, 32)
    (attn(x) * weights).sum().backward()
    assert allowed == [{"efficient": True, "math": True, "flash": False, "cudnn": False}]
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the call
    grad = attn.rel_pos.table.grad.clone()
    assert grad.abs().min() > 0  # every table entry receives a gradient

    # the same with the attention written out
    table = attn.rel_pos.table.detach().clone().requires_grad_(True)
    q, k, v = attn.qkv(x).reshape(2, 16, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    bias = table.flatten(1)[:, relative_position_index(4, 4, x.device)]
    probs = (q @ k.transpose(-1, -2) / 8**0.5 + bias).softmax(-1)
    y = attn.proj((probs @ v).transpose(1, 2).reshape(2, 4, 4, 32))
    (y * weights).sum().backward()
    torch.testing.assert_close(grad, table.grad, rtol=1e-4, atol=1e-6)


def test_batchnorm_keeps_bf16_activations_and_fp32_statistics() -> None:
    """Under bf16 the normalisation takes the bf16 input directly (no fp32 copy to save for the
    backward), keeps fp32 running statistics, and matches the fp32 computation."""
    torch.manual_seed(0)
    reference = BatchNorm2d(8).train()
    norm = copy.deepcopy(reference).to(torch.bfloat16)
    x = torch.randn(4, 8, 6, 6)
    saved: list[torch.dtype] = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.dtype) or t, lambda t: t
    ):
        y = norm(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert saved[0] == torch.bfloat16  # the input itself, not an fp32 copy
    assert norm.running_mean.dtype == norm.running_var.dtype == torch.float32
    expected = reference(x)
    torch.testing.assert_close(y.float(), expected, rtol=0.02, atol=0.02)
    torch.testing.assert_close(norm.running_mean, reference.running_mean, rtol=0.01, atol=1e-3)
    y.float().sum().backward()
    assert norm.weight.grad.dtype == torch.bfloat16 and torch.isfinite(norm.weight.grad).all()


def test_checkpointing_switches_off_per_stage_and_rejects_unknown_stage() -> None:
    model = small()
    model.set_grad_checkpointing(True)
    model.set_grad_checkpointing(False, ["s1"])
    assert model.grad_checkpointing == {"stem", "s2", "s3", "s4"}
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing
    with pytest.raises(ValueError, match="unknown stage"):
        model.set_grad_checkpointing(True, ["s5"])


def test_meta_build_then_init_gives_usable_model() -> None:
    model = build_model(ModelConfig(name="coatnet_debug", image_size=64), "meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    bn = model.stem.norm1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    table = next(iter(rel_tables(model).values()))
    assert 0.005 < table.std().item() < 0.05  # N(0, 0.02), not leftover memory
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


def test_no_weight_decay_names_norms_biases_and_tables_only() -> None:
    model = small()
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert set(rel_tables(model)) <= names
    assert "stem.norm1.weight" in names and "head.fc.bias" in names
    # the same set as a shape rule on the unpartitioned model, plus the 3-D tables
    assert names == {n for n, p in params.items() if p.ndim <= 1} | set(rel_tables(model))
    decayed = set(params) - names
    assert "stem.conv1.weight" in decayed and "head.fc.weight" in decayed
    # and by name, not shape: a partitioned-looking parameter (ZeRO-3 stores shape (0,)) keeps
    # its decay
    for param in model.parameters():
        param.data = torch.empty(0)
    assert model.no_weight_decay() == names


def test_relative_position_index_is_query_minus_key() -> None:
    index = relative_position_index(3, 4, torch.device("cpu"))
    assert index.shape == (12, 12)
    width = 2 * 4 - 1
    centre = (3 - 1) * width + (4 - 1)
    assert torch.equal(index.diagonal(), torch.full((12,), centre))
    # query (0, 0), key (2, 3): offset (-2, -3) -> table cell (0, 0)
    assert index[0, 11].item() == 0
    # query (2, 3), key (0, 0): offset (2, 3) -> the last cell
    assert index[11, 0].item() == (2 * 3 - 1) * width - 1


def test_resize_rel_pos_table_is_bilinear_and_keeps_the_zero_offset() -> None:
    table = torch.randn(4, 13, 13)  # CoAtNet S4 at 224: 7x7 grid
    resized = resize_rel_pos_table(table, (12, 12))  # 384
    assert resized.shape == (4, 23, 23)
    torch.testing.assert_close(resized[:, 11, 11], table[:, 6, 6])  # zero offset maps to itself
    ramp = torch.arange(13.0).expand(1, 13, 13)
    out = resize_rel_pos_table(ramp, (16, 16))[0]  # 512: 31x31; a ramp stays a ramp inside
    diffs = out[5, 2:-2].diff()
    torch.testing.assert_close(diffs, torch.full_like(diffs, diffs[0].item()))
    assert resize_rel_pos_table(table, (7, 7)) is table


def test_set_input_size_resizes_every_table_224_384_512() -> None:
    model = build_model(ModelConfig(name="coatnet0", image_size=224), "meta")
    sizes = {n: tuple(t.shape[-2:]) for n, t in rel_tables(model).items()}
    assert set(sizes.values()) == {(27, 27), (13, 13)}
    for image_size, expected in [(384, {(47, 47), (23, 23)}), (512, {(63, 63), (31, 31)})]:
        model.set_input_size(image_size)
        assert {tuple(t.shape[-2:]) for t in rel_tables(model).values()} == expected
        assert model.cfg.image_size == image_size
    built = build_model(ModelConfig(name="coatnet0", image_size=512), "meta")
    assert {n: t.shape for n, t in rel_tables(model).items()} == {
        n: t.shape for n, t in rel_tables(built).items()
    }


def test_model_runs_at_new_resolution_after_set_input_size() -> None:
    """A model runs at a size it was not built for exactly as if `set_input_size` (the
    checkpoint resize) had made the tables for it; `set_input_size` resizes them bilinearly."""
    model = small().eval()
    before = {n: t.detach().clone() for n, t in rel_tables(model).items()}
    x = torch.randn(1, 3, 96, 96)
    on_the_fly = model(x)
    model.set_input_size(96)
    assert torch.equal(model(x), on_the_fly)
    for name, table in rel_tables(model).items():
        grid = ((table.shape[-2] + 1) // 2, (table.shape[-1] + 1) // 2)
        torch.testing.assert_close(table.detach(), resize_rel_pos_table(before[name], grid))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_loading_weights_made_at_another_size_and_class_count(tmp_path: Path, suffix: str) -> None:
    source = small()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # as DeepSpeed names them
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    target = create_model("coatnet_debug", checkpoint=path, image_size=128, num_classes=5)
    own = dict(target.state_dict())
    for key, value in source.state_dict().items():
        if key.startswith("head.fc."):
            assert own[key].shape[0] == 5
        elif key.endswith("rel_pos.table"):
            grid = ((own[key].shape[-2] + 1) // 2, (own[key].shape[-1] + 1) // 2)
            assert grid == (8, 8) or grid == (4, 4)
            torch.testing.assert_close(own[key], resize_rel_pos_table(value, grid))
        else:
            assert torch.equal(own[key], value), key
    assert target(torch.randn(1, 3, 128, 128)).shape == (1, 5)
    assert load_weights(small(num_classes=5), path) == ["head.fc.weight", "head.fc.bias"]


def test_loading_weights_of_another_variant_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c0.pt"
    torch.save(small("coatnet0").state_dict(), path)
    with pytest.raises(ValueError, match="does not fit coatnet_debug"):
        create_model("coatnet_debug", checkpoint=path, image_size=64)


def test_the_bias_follows_the_table_however_it_is_written_and_the_index_is_cached() -> None:
    """No stale bias: written in place, through `.data` (how the EMA evaluation swaps weights)
    or replaced, the table is what the next forward gathers; the index is cached per grid."""
    bias = RelPosBias(2, (3, 3))
    torch.nn.init.normal_(bias.table)
    with torch.no_grad():
        first = bias(3, 3)
        bias.table.add_(1.0)
        torch.testing.assert_close(bias(3, 3), first + 1.0)
        bias.table.data.add_(1.0)
        torch.testing.assert_close(bias(3, 3), first + 2.0)
        assert bias(5, 4).shape == (2, 20, 20)
    hits = relative_position_index.cache_info().hits
    bias(5, 4)
    assert relative_position_index.cache_info().hits == hits + 1
    assert bias(3, 3).requires_grad  # training gathers with gradient


def test_timm_create_model_accepts_timm_kwargs() -> None:
    model = timm.create_model("coatnet_debug", num_classes=7, img_size=96)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 7)
    with pytest.raises(TypeError, match="unknown CoAtNet option"):
        timm.create_model("coatnet_debug", no_such_option=1)


def test_models_package_imports_neither_deepspeed_nor_torch_distributed() -> None:
    package = Path(coatnet_scale.__file__).parent / "models"
    banned = ("deepspeed", "torch.distributed")
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            bad = [n for n in names if any(n == b or n.startswith(b + ".") for b in banned)]
            assert not bad, f"{path.name} imports {bad}"
