"""timm's model contract, checked on our variants the way timm's own model test-suite checks its
models (forward and backward at the sizes its rules pick, default cfgs, unpooled features,
features_only, forward_intermediates, TorchScript, FX), plus what goes beyond timm: any input size.

Each behaviour runs on coatnet0, coatnet1 and coatnet_debug (the larger variants share the code;
the structural tests build them on the meta device). Where timm only checks that something runs,
these tests also compare with the eager model's output.
"""

import dataclasses
import math
import os
from pathlib import Path

import pytest
import timm
import torch
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import (
    NodePathTracer,
    create_feature_extractor,
    get_graph_node_names,
)

import coatnet_scale  # noqa: F401  (registers the variants)
from coatnet_scale.checkpoint.export import write_export_folder
from coatnet_scale.models import ARCHS, STAGE_STRIDES, create_model, load_weights
from coatnet_scale.models.config import ModelConfig

VARIANTS = ["coatnet_debug", "coatnet0", "coatnet1"]
# timm's size rules: the built size capped at a per-test target, or min_input_size when the built
# size exceeds the target (as timm's tests/test_models.py chooses them).
TARGET_FORWARD, TARGET_BACKWARD, TARGET_FEATURES, TARGET_FX, TARGET_SCRIPT = 384, 128, 96, 128, 128


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def input_size(model: torch.nn.Module, target: int) -> tuple[int, int, int]:
    cfg = model.pretrained_cfg
    size = tuple(cfg["input_size"])
    if cfg.get("fixed_input_size"):
        return size
    if max(size) > target:
        return tuple(cfg["min_input_size"]) if cfg.get("min_input_size") else (3, target, target)
    return size


def fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """The model symbolically traced (torchvision's feature extraction over torch.fx, with timm's
    leaf modules and wrapped functions), returning the model's output."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(),
        autowrap_functions=get_notrace_functions(),
        param_shapes_constant=True,
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:  # the nodes feeding the graph's output, found in the train-mode trace
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in nodes[0]._input_nodes]
    return create_feature_extractor(
        model,
        train_return_nodes=train_return,
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    )


def only_output(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(tuple(outputs.values()))


# ---- forward, backward ----------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_with_and_without_activation_checkpointing(name: str) -> None:
    model = timm.create_model(name).eval()
    x = torch.randn(1, *input_size(model, TARGET_FORWARD))
    out = model(x)  # with gradients, as timm's test: checkpointing acts only then
    model.set_grad_checkpointing()
    again = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    torch.testing.assert_close(again, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_backward_reaches_every_parameter_at_timms_size_and_at_an_unbuilt_one(name: str) -> None:
    """At the size timm's test picks (32 here: min_input_size) and at 96, neither the built 224:
    every parameter gets a gradient; at 96 the relative-position tables (resized on the fly) a
    non-zero one (at 32 the last stage attends over a single position: its bias cancels)."""
    model = timm.create_model(name, num_classes=42).train()
    for size in (input_size(model, TARGET_BACKWARD), (3, 96, 96)):
        model.zero_grad(set_to_none=True)
        out = model(torch.randn(2, *size))
        out.mean().backward()
        assert out.shape == (2, 42) and torch.isfinite(out).all()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"no gradient at {size} for {missing[:3]}"
    tables = [p for n, p in model.named_parameters() if n.endswith("rel_pos.table")]
    assert all(p.grad.abs().sum() > 0 for p in tables)


# ---- default cfgs: features, pre-logits, classifier removal ----------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_default_cfg_features_prelogits_and_classifier_removal(name: str) -> None:
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == 1000 and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *cfg["input_size"])
    pool = tuple(cfg["pool_size"])
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model(x)
        assert features.shape == (1, model.num_features, *pool)
        assert pre_logits.shape == (1, model.head_hidden_size)
        # the classifier is the last layer: logits = fc(pre_logits)
        torch.testing.assert_close(model.get_classifier()(pre_logits), logits)

        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == pre_logits.shape
        torch.testing.assert_close(pooled, pre_logits)

        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.shape == (1, model.head_hidden_size, *pool)
        # norm and pre-logits applied per position: averaging commutes with neither, but at a
        # 1x1 map (32 px) the unpooled output is the pooled one
        if pool == (1, 1):
            torch.testing.assert_close(unpooled.flatten(1), pre_logits)

        headless = timm.create_model(name, num_classes=0, global_pool="").eval()
        assert headless(x).shape == (1, headless.head_hidden_size, *pool)
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state
    assert f"{cfg['classifier']}.weight" in timm.create_model(name).state_dict()


def test_unpooled_head_is_the_pooled_head_applied_at_every_position() -> None:
    """reset_classifier(0, "") turns the head's linear layers into 1x1 convolutions with the same
    weights (timm's head): each position of the unpooled map is what the pooled head would give
    for a map that is that position's features everywhere."""
    model = timm.create_model("coatnet_debug", img_size=64).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 64, 64))
        model.reset_classifier(0)
        at_corner = model.forward_head(features[..., :1, :1])
        model.reset_classifier(0, "")
        unpooled = model.forward_head(features)
    torch.testing.assert_close(unpooled[..., 0, 0], at_corner)


# ---- multi-scale features --------------------------------------------------------------------


def assert_maps(maps: list[torch.Tensor], info: FeatureInfo, size: tuple[int, int, int]) -> None:
    assert len(maps) == len(info.channels()) == 5
    for channels, reduction, m in zip(info.channels(), info.reduction(), maps, strict=True):
        assert m.shape == (1, channels, size[1] // reduction, size[2] // reduction)
        assert torch.isfinite(m).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_intermediates_are_the_stage_maps(name: str) -> None:
    model = timm.create_model(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    assert info.reduction() == list(STAGE_STRIDES.values())
    size = input_size(model, TARGET_FEATURES)
    x = torch.randn(1, *size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, output_fmt="NCHW")
        assert_maps(maps, info, size)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(maps[-1], final)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape for m in last_two] == [m.shape for m in maps[-2:]]
    model.set_grad_checkpointing()
    again, _ = model.forward_intermediates(x)  # with gradients: checkpointing acts
    torch.testing.assert_close(again, final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("feature_cls", [None, "getter"])
def test_features_only_gives_the_intermediates(name: str, feature_cls: str | None) -> None:
    """timm's features_only wrapper (the default and the explicit `_features` getter): five NCHW
    maps whose channels and strides feature_info states, equal to forward_intermediates'."""
    extra = {"feature_cls": feature_cls} if feature_cls else {}
    features = timm.create_model(name, features_only=True, **extra).eval()
    full = timm.create_model(name).eval()
    full.load_state_dict(features.model.state_dict(), strict=False)
    size = input_size(features, TARGET_FEATURES)
    x = torch.randn(1, *size)
    with torch.no_grad():
        maps = features(x)
        assert_maps(maps, features.feature_info, size)
        reference = full.forward_intermediates(x, intermediates_only=True)
    for m, r in zip(maps, reference, strict=True):
        torch.testing.assert_close(m, r)
    early = timm.create_model(name, features_only=True, out_indices=(1, 2)).eval()
    assert early.feature_info.channels() == [a[-1].width for a in ARCHS[name].stages[:2]]
    assert len(early.model.stages) == 2  # the stages after the last one taken are pruned


# ---- TorchScript and FX ----------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_torchscript_matches_eager(name: str) -> None:
    with timm.set_scriptable(True):
        model = timm.create_model(name).eval()
    x = torch.randn(1, *input_size(model, TARGET_SCRIPT))
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        # the built size (timm tests its fixed-size CoAtNets there) and one not built for
        for other in (torch.randn(1, 3, 224, 224), torch.randn(1, 3, 64, 96)):
            torch.testing.assert_close(scripted(other), model(other))


@pytest.mark.parametrize("name", VARIANTS)
def test_fx_forward_equals_eager(name: str) -> None:
    model = timm.create_model(name).eval()
    x = torch.randn(1, *input_size(model, TARGET_FX))
    traced = fx_model(model)
    with torch.inference_mode():
        assert torch.equal(only_output(traced(x)), model(x))
        # one trace runs at other sizes too: the graph is not specialised to the traced one
        for other in (torch.randn(1, 3, 96, 64), torch.randn(1, 3, 224, 160)):
            assert torch.equal(only_output(traced(other)), model(other))


@pytest.mark.parametrize("name", VARIANTS)
def test_fx_backward_reaches_every_parameter(name: str) -> None:
    model = timm.create_model(name, num_classes=42).train()
    count = sum(p.numel() for p in model.parameters())
    traced = fx_model(model, train=True)
    sizes = [input_size(model, TARGET_FX)] + ([(3, 224, 224)] if name == "coatnet_debug" else [])
    for size in sizes:
        traced.zero_grad(set_to_none=True)
        out = only_output(traced(torch.randn(2, *size)))
        out.mean().backward()
        missing = [n for n, p in traced.named_parameters() if p.grad is None]
        assert not missing and sum(p.grad.numel() for p in traced.parameters()) == count
        assert out.shape == (2, 42) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_fx_then_torchscript(name: str) -> None:
    with timm.set_scriptable(True):
        model = timm.create_model(name).eval()
    x = torch.randn(1, *input_size(model, TARGET_SCRIPT))
    scripted = torch.jit.script(fx_model(model))
    with torch.inference_mode():
        torch.testing.assert_close(only_output(scripted(x)), model(x))


# ---- any input size (beyond timm) ------------------------------------------------------------


def test_pretrained_cfg_says_the_input_size_is_free() -> None:
    cfg = timm.create_model("coatnet_debug").pretrained_cfg
    assert cfg["fixed_input_size"] is False
    assert tuple(cfg["min_input_size"]) == (3, 32, 32)
    model = timm.create_model("coatnet_debug").eval()
    with pytest.raises(AssertionError, match="multiple of 32"):
        model(torch.randn(1, 3, 80, 64))


@pytest.mark.parametrize("name", ["coatnet_debug", "coatnet0"])
def test_running_at_another_size_equals_loading_the_weights_at_that_size(
    name: str, tmp_path: Path
) -> None:
    """Built at 64 and run at 128: the same logits as a model built at 128 that loaded the
    weights (its tables resized bilinearly by `checkpoint_filter_fn`, as fine-tuning does)."""
    built = create_model(name, image_size=64, num_classes=10).eval()
    path = tmp_path / "weights.pt"
    torch.save(built.state_dict(), path)
    resized = create_model(name, image_size=128, num_classes=10).eval()
    load_weights(resized, path)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(built(x), resized(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_variant_runs_at_another_size_on_the_meta_device(name: str) -> None:
    """Structure only (no memory): every variant built at 224 runs at 384 and at 320x256, and its
    features and intermediates have the advertised shapes."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        for height, width in ((384, 384), (320, 256)):
            x = torch.empty(1, 3, height, width)
            assert model(x).shape == (1, 1000)
            maps = model.forward_intermediates(x, intermediates_only=True)
            for info, m in zip(model.feature_info, maps, strict=True):
                r = info["reduction"]
                assert m.shape == (1, info["num_chs"], height // r, width // r)


# ---- export: one line of plain timm ----------------------------------------------------------


@pytest.mark.parametrize(("image_size", "num_classes"), [(32, 10), (224, 1000)])
def test_an_export_loads_in_one_line_of_timm(
    tmp_path: Path, image_size: int, num_classes: int
) -> None:
    trained = create_model("coatnet_debug", image_size=image_size, num_classes=num_classes)
    trained.eval()
    out = tmp_path / "export"
    previous = os.umask(0o077)  # a private umask: an export is still meant to be shared
    try:
        write_export_folder(trained.state_dict(), trained.cfg, out, {"step": 7})
    finally:
        os.umask(previous)
    for path in out.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, f"{path.name} is not group/other-readable"

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert loaded.num_classes == num_classes
    assert loaded.pretrained_cfg["input_size"] == (3, image_size, image_size)
    ours = create_model(
        "coatnet_debug", checkpoint=out, image_size=image_size, num_classes=num_classes
    ).eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
        assert torch.equal(loaded(x), ours(x))
    # timm's transforms for it follow the export's pretrained_cfg
    data_cfg = timm.data.resolve_data_config(model=loaded)
    assert data_cfg["input_size"] == (3, image_size, image_size)


def test_an_export_config_rebuilds_every_model_option(tmp_path: Path) -> None:
    cfg = ModelConfig(
        name="coatnet_debug", image_size=64, num_classes=5, mbconv_stride="dwconv", head="gap_fc"
    )
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "name"}
    model = create_model(cfg.name, **options)
    write_export_folder(model.state_dict(), cfg, tmp_path, {})
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert loaded.cfg == cfg
    assert torch.equal(loaded.stem.conv1.weight, model.stem.conv1.weight)


def test_feature_maps_shrink_by_the_stated_reduction() -> None:
    model = timm.create_model("coatnet_debug", features_only=True).eval()
    maps = model(torch.randn(1, 3, 160, 96))
    for m, r in zip(maps, model.feature_info.reduction(), strict=True):
        assert m.shape[-2:] == (math.ceil(160 / r), math.ceil(96 / r))


# ---- timm's helpers instead of our copies: the same results as the code they replaced ---------


def test_stochastic_depth_rates_are_the_linear_ramp_we_computed_before() -> None:
    """timm's calculate_drop_path_rates replaced our ramp, rate * i / (n - 1) over all blocks."""
    for name in ("coatnet_debug", "coatnet0", "coatnet6"):
        model = create_model(name, drop_path_rate=0.3, device="meta")
        branches = [getattr(b, "drop_path", None) or b.drop_path1 for s in model.stages for b in s]
        rates = [getattr(drop, "drop_prob", 0.0) for drop in branches]  # rate 0: nn.Identity
        n = len(rates)
        assert rates == pytest.approx([0.3 * i / (n - 1) for i in range(n)], abs=1e-7)


def _previous_head(x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head this code had before timm's NormMlpClassifierHead: mean over H, W, LayerNorm,
    Linear + tanh (keys `head.pre_logits.0.*`), Linear."""
    pooled = x.mean(dim=(2, 3))
    normed = torch.nn.functional.layer_norm(
        pooled, pooled.shape[-1:], state["head.norm.weight"], state["head.norm.bias"], 1e-5
    )
    hidden = torch.tanh(
        normed @ state["head.pre_logits.0.weight"].T + state["head.pre_logits.0.bias"]
    )
    return hidden @ state["head.fc.weight"].T + state["head.fc.bias"]


def test_timms_head_computes_the_previous_head_and_loads_its_keys(tmp_path: Path) -> None:
    model = create_model("coatnet_debug", image_size=64, num_classes=7).eval()
    old_state = {
        k.replace("head.pre_logits.fc.", "head.pre_logits.0."): torch.randn_like(v)
        if k.startswith("head.") and v.is_floating_point()
        else v
        for k, v in model.state_dict().items()
    }
    assert "head.pre_logits.0.weight" in old_state
    model.load_state_dict(old_state)  # the load hook renames the legacy keys (also for DeepSpeed)
    features = torch.randn(3, model.num_features, 2, 2)
    with torch.no_grad():
        expected = _previous_head(features, old_state)
        torch.testing.assert_close(model.forward_head(features), expected)
    # and through every file-based path (exports and init_from use checkpoint_filter_fn)
    torch.save(old_state, tmp_path / "old.pt")
    again = create_model("coatnet_debug", checkpoint=tmp_path / "old.pt", image_size=64)
    assert again.num_classes == 1000  # another class count: the classifier is not taken
    torch.testing.assert_close(
        again.head.pre_logits.fc.weight, old_state["head.pre_logits.0.weight"]
    )


def test_our_relative_position_index_is_timms() -> None:
    """Kept ours only because TorchScript cannot compile timm's; the index is the same."""
    from timm.layers import gen_relative_position_index

    from coatnet_scale.models.layers import relative_position_index

    for grid in ((1, 1), (2, 3), (7, 7), (14, 14), (12, 9)):
        expected = gen_relative_position_index(grid)
        assert torch.equal(relative_position_index(*grid, torch.device("cpu")), expected)


def test_wrapper_prefixes_are_stripped_in_any_order() -> None:
    """timm's clean_state_dict replaced our prefix loop: DeepSpeed's `module.`, torch.compile's
    `_orig_mod.`, nested either way."""
    from coatnet_scale.models import checkpoint_filter_fn

    model = create_model("coatnet_debug", image_size=32, num_classes=3, device="meta")
    state = model.state_dict()
    prefixes = ("module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod.", "module.module.")
    for prefix in prefixes:
        filtered = checkpoint_filter_fn({prefix + k: v for k, v in state.items()}, model)
        assert set(filtered) == set(state)


# ---- consistency after pruning and resizing ----------------------------------------------------


def test_a_pruned_model_stays_usable() -> None:
    model = timm.create_model("coatnet_debug", features_only=True, out_indices=(1, 2)).model
    x = torch.randn(1, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (1, model.num_features, 8, 8) and model.num_classes == 0
    assert model.forward_head(features, pre_logits=True).shape == features.shape  # no pooling
    model.set_input_size(96)  # only the stages left
    assert [n for n, _ in model._units()][-1] == "s2"


def test_an_unpooled_classifier_needs_the_prelogits_head() -> None:
    with pytest.raises(ValueError, match="pre-logits head"):
        timm.create_model("coatnet_debug", head="gap_fc").reset_classifier(5, "")
    model = timm.create_model("coatnet_debug").eval()
    model.reset_classifier(5, "")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5, 2, 2)


def test_timms_data_config_follows_the_built_size() -> None:
    model = timm.create_model("coatnet_debug", img_size=96)
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 96, 96)
    model.set_input_size(128)
    assert model.pretrained_cfg["input_size"] == (3, 128, 128)
    assert tuple(model.pretrained_cfg["pool_size"]) == (4, 4)


def test_universal_checkpoints_with_the_old_head_names_get_todays(tmp_path: Path) -> None:
    from coatnet_scale.checkpoint.resume import rename_legacy_parameter_folders

    zero = tmp_path / "zero"
    for name in ("head.pre_logits.0.weight", "head.pre_logits.0.bias", "head.fc.weight"):
        (zero / name).mkdir(parents=True)
        (zero / name / "fp32.pt").write_text(name)
    rename_legacy_parameter_folders(tmp_path)
    names = sorted(p.name for p in zero.iterdir())
    assert names == ["head.fc.weight", "head.pre_logits.fc.bias", "head.pre_logits.fc.weight"]
    assert (zero / "head.pre_logits.fc.bias" / "fp32.pt").read_text() == "head.pre_logits.0.bias"
