"""The config tree: loading, precedence, validation errors, dumping and the command line."""

import dataclasses
from pathlib import Path

import pytest

from coatnet_scale.cli import config_parser, parse_config_args
from coatnet_scale.config import (
    CONFIGS_DIR,
    Config,
    ConfigError,
    config_hash,
    describe,
    dump_yaml,
    load_config,
)
from coatnet_scale.fields import field_doc
from coatnet_scale.models import ARCHS


def test_defaults_validate_and_are_frozen() -> None:
    cfg = load_config()
    assert cfg == Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_every_field_has_a_one_line_doc() -> None:
    def walk(obj: object, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            doc = field_doc(f)
            assert doc and "\n" not in doc, f"{prefix}{f.name} has no one-line doc"
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")

    walk(Config(), "")
    assert len(describe()) > 50


def test_required_sections_exist() -> None:
    names = {f.name for f in dataclasses.fields(Config)}
    assert {
        "model",
        "data",
        "optim",
        "schedule",
        "precision",
        "zero",
        "activation_checkpointing",
        "checkpoint",
        "logging",
        "distributed",
    } <= names


@pytest.mark.parametrize("model", list(ARCHS))
def test_every_variant_has_a_recipe_that_validates(model: str) -> None:
    assert (CONFIGS_DIR / f"{model}.yaml").is_file()
    cfg = load_config(model=model)
    assert cfg.model.name == model


def test_precedence_recipe_then_files_then_overrides(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text("optim:\n  lr: 2.0e-3\n  weight_decay: 0.1\ntrain:\n  seed: 5\n")
    second = tmp_path / "b.yaml"
    second.write_text("optim:\n  lr: 3e-3\n")  # PyYAML reads 3e-3 as a string; still a float
    cfg = load_config([first, second], ["train.seed=9"], model="coatnet2")
    assert cfg.model.drop_path_rate == 0.5  # from configs/coatnet2.yaml
    assert cfg.optim.weight_decay == 0.1  # from a.yaml
    assert cfg.optim.lr == 3e-3  # b.yaml over a.yaml
    assert cfg.train.seed == 9  # the override last


def test_overrides_parse_every_field_type() -> None:
    cfg = load_config(
        overrides=[
            "optim.lr=5e-4",
            "zero.stage=3",
            "zero.offload_params=cpu",
            "zero.overlap_comm=false",
            "optim.betas=[0.9, 0.95]",
            "activation_checkpointing.policy=stages",
            "activation_checkpointing.stages=stem,s1",
            "logging.wandb_entity=my-team",
            "data.train_shards=/data/in21k-{000000..000999}.tar,/data/extra-{a,b}.tar",
            "zero.reduce_bucket_size=2e8",
        ]
    )
    assert cfg.optim.lr == 5e-4
    assert cfg.zero.stage == 3 and cfg.zero.offload_params == "cpu"
    assert cfg.zero.overlap_comm is False
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.activation_checkpointing.checkpointed_stages() == ("stem", "s1")
    assert cfg.logging.wandb_entity == "my-team"
    assert cfg.data.train_shards == ("/data/in21k-{000000..000999}.tar", "/data/extra-{a,b}.tar")
    assert cfg.zero.reduce_bucket_size == 200_000_000
    assert load_config(overrides=["logging.wandb_entity=null"]).logging.wandb_entity is None


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("optim.lrr=1e-3", "optim.lrr", "did you mean 'lr'"),
        ("optimm.lr=1e-3", "optimm", "did you mean 'optim'"),
        ("optim.lr=fast", "optim.lr", "expected a number"),
        ("train.total_steps=1.5", "train.total_steps", "expected an integer"),
        ("zero.overlap_comm=maybe", "zero.overlap_comm", "true or false"),
        ("precision.dtype=bf61", "precision.dtype", "did you mean 'bf16'"),
        ("model.name=coatnet66", "model.name", "did you mean 'coatnet6'"),
        ("zero.stage=4", "zero.stage", "0, 1, 2, 3"),
        ("model.image_size=100", "model.image_size", "multiple of 32"),
        ("model.c6_s4_width=3072", "model.c6_s4_width", "coatnet6 only"),
        ("model.num_classes=0", "model.num_classes", "training needs a classifier"),
        ("model.num_classes=-1", "model.num_classes", ">= 0"),
        ("zero.offload_params=cpu", "zero.offload_params", "stage=3"),
        ("optim.betas=[0.9]", "optim.betas", "two values"),
        ("activation_checkpointing.policy=stages", "activation_checkpointing.stages", "at least"),
        ("activation_checkpointing.stages=s9", "activation_checkpointing.stages", "unknown stage"),
        ("schedule.min_lr=1.0", "schedule.min_lr", "above optim.lr"),
        ("train.micro_batch_size=48", "train.global_batch_size", "multiple of micro_batch_size"),
        ("optim=3", "optim", "mapping"),
        ("optim.lr", "", "section.key=value"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(override: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert info.value.key == key
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("schedule:\n  warmup_step: 10\n")
    with pytest.raises(ConfigError, match=r"schedule.warmup_step: .*did you mean 'warmup_steps'"):
        load_config([path])


def test_conflicting_model_names_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "other.yaml"
    path.write_text("model:\n  name: coatnet3\n")
    with pytest.raises(ConfigError, match="--model is 'coatnet1'"):
        load_config([path], model="coatnet1")


def test_missing_and_malformed_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "absent.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])


@pytest.mark.parametrize("model", ["coatnet0", "coatnet6"])
def test_dump_and_load_give_an_equal_tree(tmp_path: Path, model: str) -> None:
    cfg = load_config(
        model=model,
        overrides=[
            "optim.betas=[0.8,0.9]",
            "logging.wandb_entity=team",
            "data.val_shards=/v/{0..3}.tar",
            "activation_checkpointing.policy=stages",
            "activation_checkpointing.stages=[s1,s2]",
        ],
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config([path])
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(model=model)) != config_hash(cfg)
    assert "# peak learning rate" in path.read_text()


def test_command_line_forms_and_deepspeed_local_rank(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  seed: 3\n")
    parser = config_parser("test")
    cfg, args = parse_config_args(
        [
            "--local_rank=1",
            "optim.lr=4e-4",
            "--model",
            "coatnet1",
            "--config",
            str(extra),
            "--zero.stage=1",
            "--train.total_steps",
            "20000",
            "schedule.warmup_steps=77",
        ],
        parser,
    )
    assert cfg.model.name == "coatnet1"
    assert cfg.train.seed == 3
    assert cfg.optim.lr == 4e-4 and cfg.zero.stage == 1 and cfg.train.total_steps == 20000
    assert cfg.schedule.warmup_steps == 77
    assert args.local_rank == 1


def test_command_line_errors_exit_with_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config_args(["optim.lrr=1"], config_parser("test"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optim.lrr" in err and "did you mean 'lr'" in err
    with pytest.raises(SystemExit):
        parse_config_args(["--bogus"], config_parser("test"))


def test_print_config_emits_loadable_yaml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config_args(["--model", "coatnet7", "--print-config"], config_parser("test"))
    assert info.value.code == 0
    path = tmp_path / "printed.yaml"
    path.write_text(capsys.readouterr().out)
    assert load_config([path]) == load_config(model="coatnet7")


IMAGENET_1K = 1_281_167
# Table 10's fine-tuning columns: batch, mixup, RandAugment (n, m), image size; every column:
# 30 epochs, constant LR 5e-5, weight decay 1e-8, EMA 0.9999, clip 1.0, softmax + smoothing 0.1.
FINETUNE_COLUMNS = {
    "finetune_384.yaml": (512, 0.8, (2, 15), 384),  # IN-1K FT
    "finetune_512.yaml": (512, 0.8, (2, 15), 512),
    "finetune_in21k_384.yaml": (1024, 0.0, (0, 15), 384),  # IN-21K FT (RandAugment off)
    "finetune_jft_384.yaml": (512, 0.0, (2, 5), 384),  # JFT FT
}


def header_command(path: Path) -> list[str]:
    """The `deepspeed ... launch/pretrain.py ARGS` command a config file's header shows."""
    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("deepspeed "))
    command = []
    for line in lines[start:]:
        command += line.removesuffix("\\").split()
        if not line.endswith("\\"):
            break
    return command[command.index("launch/pretrain.py") + 1 :]


@pytest.mark.parametrize("name", sorted(FINETUNE_COLUMNS))
def test_each_finetune_overlay_runs_its_table_10_column(name: str) -> None:
    batch, mixup, (ra_n, ra_m), size = FINETUNE_COLUMNS[name]
    cfg, _ = parse_config_args(header_command(CONFIGS_DIR / name), config_parser("t"))
    assert cfg.train.global_batch_size == batch and cfg.model.image_size == size
    assert cfg.train.total_steps == -(-30 * IMAGENET_1K // batch)  # 30 epochs, rounded up
    assert cfg.data.mixup_alpha == mixup and cfg.data.cutmix_alpha == 0.0
    assert (cfg.data.randaugment_n, cfg.data.randaugment_n and cfg.data.randaugment_m) == (
        ra_n,
        ra_n and ra_m,
    )
    assert (cfg.optim.lr, cfg.schedule.min_lr, cfg.schedule.decay) == (5e-5, 5e-5, "constant")
    assert (cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.train.ema_decay) == (1e-8, 1.0, 0.9999)
    assert (cfg.train.loss, cfg.train.label_smoothing, cfg.model.num_classes) == (
        "softmax",
        0.1,
        1000,
    )
    assert cfg.schedule.warmup_steps == 0 and cfg.checkpoint.init_from


def test_the_jft_overlay_sets_finetuning_stochastic_depth() -> None:
    """JFT fine-tuning has its own stochastic depth (C3/4/5: 0.1/0.3/0.2), unlike the other
    columns, where one value spans pretraining and fine-tuning."""
    cfg, _ = parse_config_args(
        header_command(CONFIGS_DIR / "finetune_jft_384.yaml"), config_parser("t")
    )
    assert cfg.model.name == "coatnet5" and cfg.model.drop_path_rate == 0.2
    pretraining = load_config(model="coatnet5")
    assert pretraining.model.drop_path_rate == 0.0
