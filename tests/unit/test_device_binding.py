"""Which device each rank binds, decided before the process group starts, on a CPU machine with
CUDA mocked; GPUs that torch cannot use; SLURM node lists; what a rank reports about itself.
(The whole loop under a mocked 8-GPU node: test_fake_cuda_run.py.)"""

from __future__ import annotations

import os
import subprocess
from types import SimpleNamespace

import pytest
import torch

from coatnet_scale.distributed import device as dev
from coatnet_scale.distributed import env as env_module
from coatnet_scale.distributed.device import (
    DeviceError,
    bind_device,
    check_distinct_devices,
    cpu_ranges,
    cpu_starvation,
    describe_rank,
    visible_device_index,
)
from coatnet_scale.distributed.env import dist_env, expand_nodelist, first_slurm_host
from tests.data.conftest import shard_set


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as on an 8-GPU node (or fewer, per test); records set_device."""
    calls: list[int] = []
    node = SimpleNamespace(count=8, set_device=calls)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: node.count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(int(index)))
    return node


def test_every_rank_binds_its_local_rank_when_it_sees_the_whole_node(fake_cuda) -> None:
    binding = bind_device(local_rank=5, local_world_size=8, choice="auto")
    assert binding.device == torch.device("cuda", 5) and binding.index == 5
    assert fake_cuda.set_device == [5]  # made current, not only named


def test_a_task_bound_to_one_gpu_by_slurm_uses_device_0(fake_cuda) -> None:
    """srun --gpus-per-task=1: CUDA_VISIBLE_DEVICES holds this task's GPU alone."""
    fake_cuda.count = 1
    binding = bind_device(local_rank=5, local_world_size=8, choice="cuda")
    assert binding.device == torch.device("cuda", 0) and fake_cuda.set_device == [0]
    # DeepSpeed reads LOCAL_RANK as the device index: the export says 0, the rank stays 5.
    slurm = dist_env({"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NTASKS": "16"})
    exported = slurm.export(binding.index)
    assert exported["LOCAL_RANK"] == "0" and exported["RANK"] == "13"
    assert slurm.export()["LOCAL_RANK"] == "5"


def test_a_visibility_that_cannot_be_mapped_is_an_error() -> None:
    assert visible_device_index(3, 8, 8) == 3
    assert visible_device_index(3, 4, 8) == 3  # fewer ranks than GPUs: the first ones
    assert visible_device_index(3, 8, 1) == 0
    with pytest.raises(DeviceError, match="exactly one"):
        visible_device_index(3, 4, 2)  # 2 of the node's GPUs each: which one is ours?


def test_cpu_on_purpose_never_touches_cuda(fake_cuda) -> None:
    binding = bind_device(local_rank=1, local_world_size=2, choice="cpu")
    assert binding.device == torch.device("cpu") and binding.index is None
    assert fake_cuda.set_device == []


def test_gpus_torch_cannot_use_stop_the_run_instead_of_training_on_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "cuda_unusable_reason", lambda: "The NVIDIA driver is too old")
    gpus = ["/dev/nvidia0", "/dev/nvidia1"]
    with pytest.raises(DeviceError) as err:
        bind_device(0, 8, "auto", find_gpus=lambda: gpus)
    message = str(err.value)
    assert "\n" not in message
    assert "/dev/nvidia0" in message and "driver is too old" in message
    assert "distributed.device=cpu" in message  # the way out, for who means it
    # No GPU on the machine: the CPU, silently (this machine, the test suite).
    assert bind_device(0, 8, "auto", find_gpus=list).device == torch.device("cpu")
    # Asking for CUDA where there is none: an error, GPU files or not.
    with pytest.raises(DeviceError, match="distributed.device=cuda"):
        bind_device(0, 8, "cuda", find_gpus=list)


def test_gpu_device_files_are_found(tmp_path) -> None:
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert dev.gpus_present(tmp_path) == [str(tmp_path / "nvidia0"), str(tmp_path / "nvidia1")]


def test_the_unusable_reason_is_torchs_own() -> None:
    reason = dev.cuda_unusable_reason()  # this machine: a CUDA build without a driver
    assert reason and "\n" not in reason


def test_two_ranks_on_one_gpu_are_refused() -> None:
    a = {"rank": 0, "host": "n1", "gpu": "H100", "gpu_uuid": "GPU-1"}
    b = {"rank": 1, "host": "n1", "gpu": "H100", "gpu_uuid": "GPU-2"}
    check_distinct_devices([a, b, {**b, "rank": 2, "host": "n2"}])  # another host: fine
    with pytest.raises(DeviceError, match="ranks 0 and 3 both compute on H100 GPU-1"):
        check_distinct_devices([a, b, {**a, "rank": 3}])
    check_distinct_devices([{"rank": 0, "host": "n1"}, {"rank": 1, "host": "n1"}])  # CPU ranks


def test_a_rank_reports_device_affinity_and_memory() -> None:
    report = dev.rank_report(3, dev.DeviceBinding(torch.device("cpu")))
    assert report["rank"] == 3 and report["device"] == "cpu"
    assert report["cpus"] and report["host_free_gib"] > 0
    line = describe_rank(report)
    assert line.startswith("rank 3 on ") and "CPU(s)" in line and "GiB free" in line
    assert cpu_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("n1", ["n1"]),
        ("n1,n2", ["n1", "n2"]),
        ("gpu[07-10],big1", ["gpu07", "gpu08", "gpu09", "gpu10", "big1"]),
        ("a[3,5-6],b[1]", ["a3", "a5", "a6", "b1"]),
        ("node-[1-2]", ["node-1", "node-2"]),
    ],
)
def test_simple_node_lists_expand_without_scontrol(nodelist, hosts, monkeypatch) -> None:
    def no_scontrol(*args, **kwargs):
        raise AssertionError("scontrol called for a simple list")

    monkeypatch.setattr(env_module.subprocess, "run", no_scontrol)
    assert expand_nodelist(nodelist) == hosts
    assert first_slurm_host(nodelist) == hosts[0]


@pytest.mark.parametrize(
    "nodelist",
    ["rack[1-2]-n[01-02]", "rack[1-2]-n[01-02],gpu5", "n[1-2]x", "pre[1-2]mid[3]"],
)
def test_other_node_lists_go_to_scontrol(nodelist, monkeypatch) -> None:
    """Several bracket groups in one name (rack1-n01 ...), a suffix after the group: SLURM's
    own expansion, not a guess (the old regex turned rack[1-2]-n[01-04] into 'rack1')."""
    asked: list[list[str]] = []

    def scontrol(command, **kwargs):
        asked.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="rack1-n01\nrack1-n02\n", stderr="")

    monkeypatch.setattr(env_module.subprocess, "run", scontrol)
    assert first_slurm_host(nodelist) == "rack1-n01"
    assert asked == [["scontrol", "show", "hostnames", nodelist]]


def test_a_node_list_nobody_can_expand_says_what_to_set(monkeypatch) -> None:
    def missing(command, **kwargs):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(env_module.subprocess, "run", missing)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        expand_nodelist("rack[1-2]-n[01-04]")


def test_the_entry_point_says_it_in_one_line(monkeypatch, capsys, tmp_path) -> None:
    from launch.pretrain import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    shards = f"data.train_shards={shard_set(tmp_path, [4])}"
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "coatnet_debug", shards, "distributed.device=cuda"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rank 0: device error: distributed.device=cuda but torch cannot use")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "error, line, code",
    [
        ("DataError", "data error", 3),
        ("CheckpointError", "checkpoint error", 4),
        ("NonFiniteError", "non-finite steps", 5),
    ],
)
def test_errors_of_the_run_exit_with_their_code_and_one_line(
    monkeypatch, capsys, tmp_path, error, line, code
) -> None:
    """coatnet_scale.exits: each error of the data or the run has its own exit code, which the
    SLURM job does not requeue, and one line on stderr instead of a traceback."""
    import coatnet_scale.train as training
    from coatnet_scale.checkpoint import CheckpointError
    from coatnet_scale.data.pipeline import DataError
    from coatnet_scale.guard import NonFiniteError
    from launch.pretrain import main

    kinds = {e.__name__: e for e in (DataError, CheckpointError, NonFiniteError)}

    def fails(cfg):
        raise kinds[error]("what went wrong, and what to do")

    monkeypatch.setattr(training, "train", fails)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # main sets both: restored afterwards
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    shards = f"data.train_shards={shard_set(tmp_path, [4])}"
    run = tmp_path / "run"
    run.mkdir()  # a run that got as far as its folder
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "coatnet_debug", shards, "distributed.device=cpu", f"train.run_dir={run}"])
    assert exit_.value.code == code
    err = capsys.readouterr().err.strip()
    assert err == f"rank 0: {line}: what went wrong, and what to do"
    from coatnet_scale.exits import recorded_exit

    assert recorded_exit(run) == (code, err)  # for the SLURM supervisor (srun keeps one code)


def test_deepspeeds_multi_node_launch_binds_the_local_gpu(fake_cuda) -> None:
    """DeepSpeed's launcher says the ranks per node as LOCAL_SIZE (not LOCAL_WORLD_SIZE): on the
    second of two 8-GPU nodes, rank 13 is local rank 5 of 8, not of 16."""
    launcher = {
        "RANK": "13",
        "LOCAL_RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_SIZE": "8",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500",
    }
    env = dist_env(launcher)
    assert (env.local_rank, env.local_world_size, env.node_rank) == (5, 8, 1)
    assert bind_device(env.local_rank, env.local_world_size, "auto").index == 5


def test_gpus_hidden_on_purpose_mean_the_cpu(monkeypatch) -> None:
    """A CPU job on a GPU node (CUDA_VISIBLE_DEVICES empty) is not a broken driver."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    binding = bind_device(0, 1, "auto", find_gpus=lambda: ["/dev/nvidia0"])
    assert binding.device == torch.device("cpu")


def test_cpu_on_purpose_hides_the_gpus_from_deepspeed_too(monkeypatch, tmp_path) -> None:
    """DeepSpeed picks CUDA as its accelerator wherever torch sees a GPU; the entry point makes
    `distributed.device=cpu` its CPU accelerator before DeepSpeed is imported."""
    import coatnet_scale.train
    from launch.pretrain import main

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    seen = {}

    def fake_train(cfg):
        seen.update(DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR"), device=cfg.distributed.device)
        seen["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        return {}

    monkeypatch.setattr(coatnet_scale.train, "train", fake_train)
    shards = f"data.train_shards={shard_set(tmp_path, [4])}"
    main(["--model", "coatnet_debug", shards, "distributed.device=cpu"])
    assert seen == {"DS_ACCELERATOR": "cpu", "device": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def test_a_rank_confined_to_one_cpu_is_warned_about() -> None:
    reports = [{"rank": 0, "cpus": [0, 1, 2, 3]}, {"rank": 1, "cpus": [4]}]
    assert "rank(s) 1 may use 1 CPU" in cpu_starvation(reports, loader_workers=4)
    assert cpu_starvation(reports, loader_workers=0) is None
    assert cpu_starvation(reports[:1], loader_workers=4) is None


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_is_set_so_that_every_reader_of_the_flag_can_read_it(monkeypatch, tf32) -> None:
    """precision.tf32 on a GPU: cuBLAS and cuDNN take TF32 (or not), and both of torch's APIs
    read the matmul flag back (inductor reads the legacy one when autotuning; setting only the
    new one made it raise "mix of the legacy and new APIs")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.mkldnn.matmul.fp32_precision,
    )
    benchmark = torch.backends.cudnn.benchmark
    try:
        dev.configure_cuda_math(tf32)
        assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
        assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")
        assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cudnn.benchmark
        assert torch.backends.mkldnn.matmul.fp32_precision == before[2]  # the CPU's untouched
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.mkldnn.matmul.fp32_precision = before[2]
        torch.backends.cudnn.allow_tf32 = before[1]
        torch.backends.cudnn.benchmark = benchmark
