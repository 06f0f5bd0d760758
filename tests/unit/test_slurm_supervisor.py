"""The SLURM batch-step logic without a cluster: requeue decisions, the run folder per job name,
the srun command line, config validation before anything starts. (Real jobs: tests/slurm.)"""

from __future__ import annotations

from coatnet_scale.config import load_config
from coatnet_scale.distributed import slurm as allocation
from coatnet_scale.exits import EXIT_SETUP, EXIT_STOPPED, NOT_REQUEUED
from launch.slurm import supervisor as slurm


def test_a_run_whose_checkpoint_reached_the_last_step_is_finished() -> None:
    decision = slurm.decide(0, step=100, total_steps=100, restarts=0, max_requeues=3)
    assert decision.action == "finished" and not decision.requeue  # typed, not a message
    # Even if a task was killed during teardown after the final checkpoint.
    assert not slurm.decide(143, step=100, total_steps=100, restarts=0, max_requeues=3).requeue


def test_stopped_and_failed_steps_requeue_until_the_limit() -> None:
    stopped = slurm.decide(0, step=40, total_steps=100, restarts=1, max_requeues=3)
    assert stopped.requeue and "restart 2 of at most 3" in stopped.message
    assert "stopped after a checkpoint at step 40" in stopped.message
    assert slurm.decide(EXIT_STOPPED, step=40, total_steps=100, restarts=0, max_requeues=3).requeue
    failed = slurm.decide(137, step=40, total_steps=100, restarts=0, max_requeues=3)
    assert failed.requeue and "exit code 137" in failed.message and "task N" in failed.message
    exhausted = slurm.decide(0, step=40, total_steps=100, restarts=3, max_requeues=3)
    assert exhausted.action == "stop" and "distributed.max_requeues=3" in exhausted.message
    assert not slurm.decide(1, step=0, total_steps=100, restarts=0, max_requeues=0).requeue


def test_tasks_that_could_not_start_are_not_requeued() -> None:
    """A device error or a config error (exit 2 from every task) fails the same way again:
    requeueing it up to distributed.max_requeues times only burns allocations."""
    decision = slurm.decide(EXIT_SETUP, step=40, total_steps=100, restarts=0, max_requeues=10)
    assert not decision.requeue and "could not start" in decision.message
    for code in NOT_REQUEUED:  # data, checkpoint and non-finite errors recur the same way
        assert not slurm.decide(code, step=40, total_steps=100, restarts=0, max_requeues=10).requeue
    assert slurm.decide(1, step=40, total_steps=100, restarts=0, max_requeues=10).requeue


def test_progress_comes_from_the_newest_complete_checkpoint(tmp_path) -> None:
    from tests.unit.test_checkpoint_files import fake_checkpoint

    root = tmp_path / "checkpoints"
    assert allocation.newest_step(tmp_path) == 0
    fake_checkpoint(root / "step00000010", 10)
    fake_checkpoint(root / "step00000020", 20, commit=False)  # no manifest: not complete
    assert allocation.newest_step(tmp_path) == 10


def test_the_run_folder_follows_the_job_name_unless_set() -> None:
    env = {"SLURM_JOB_NAME": "c6-jft"}
    assert allocation.run_dir_override(load_config(), env) == ["train.run_dir=runs/c6-jft"]
    assert allocation.run_dir_override(load_config([], ["train.run_dir=/ckpt/x"]), env) == []
    assert allocation.run_dir_override(load_config(), {}) == []


def test_srun_runs_the_entry_point_with_the_same_arguments() -> None:
    argv = ["--model", "coatnet6", "optim.lr=1e-3"]
    command = slurm.srun_command("/py", argv, ["a.b=c"], {})
    assert command[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert command[-5:] == [str(slurm.PRETRAIN), "--model", "coatnet6", "optim.lr=1e-3", "a.b=c"]
    assert str(slurm.PRETRAIN).endswith("launch/pretrain.py") and slurm.PRETRAIN.is_file()
    assert not any(arg.startswith("--cpus-per-task") for arg in command)


def test_srun_passes_the_allocations_cpus_per_task_on() -> None:
    """srun >= 22.05 does not inherit sbatch's --cpus-per-task: each task would get one CPU."""
    command = slurm.srun_command("/py", [], [], {"SLURM_CPUS_PER_TASK": "12"})
    assert "--cpus-per-task=12" in command
    assert command.index("--cpus-per-task=12") < command.index("/py")  # an srun option


def test_hostfile_lists_every_node_of_the_allocation() -> None:
    assert allocation.hostfile("gpu[07-09],big1", 8) == (
        "gpu07 slots=8\ngpu08 slots=8\ngpu09 slots=8\nbig1 slots=8\n"
    )


def test_a_bad_config_fails_before_srun(capsys) -> None:
    assert slurm.main(["--model", "coatnet6", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_outside_a_job_it_says_how_to_submit(monkeypatch, capsys) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm.main(["--model", "coatnet_debug"]) == 2
    assert "sbatch" in capsys.readouterr().out
