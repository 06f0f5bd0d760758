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


def test_the_first_ranks_own_exit_code_wins_over_srun_killing_the_rest(
    tmp_path, monkeypatch, capsys
) -> None:
    """A rank stops on non-finite steps (exit 5) and srun kills the others (its code: 137). The
    rank's recorded code decides: no requeue. A record from an earlier attempt is ignored."""
    import subprocess

    from coatnet_scale.exits import EXIT_NONFINITE, EXIT_REASON_FILE, record_exit
    from tests.data.conftest import shard_set

    run = tmp_path / "run"
    run.mkdir()
    record_exit(run, EXIT_NONFINITE, "stale: from the previous attempt")
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command[0])
        if command[0] == "srun":
            assert not (run / EXIT_REASON_FILE).exists()  # cleared before the attempt
            if len(calls) == 1:
                record_exit(run, EXIT_NONFINITE, "rank 3: non-finite steps: 10 in a row")
            return subprocess.CompletedProcess(command, 137)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(slurm.subprocess, "run", fake_run)
    for key, value in {"SLURM_JOB_ID": "9", "SLURM_NTASKS": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    argv = ["--model", "coatnet_debug", f"data.train_shards={shard_set(tmp_path, [8])}"]
    argv += [f"train.run_dir={run}", "train.global_batch_size=8", "train.micro_batch_size=4"]
    assert slurm.main(argv) == EXIT_NONFINITE
    out = capsys.readouterr().out
    assert "srun exit code 137; the first failure: rank 3: non-finite steps" in out
    assert "not requeueing" in out and calls == ["srun"]  # no scontrol requeue
    # a crash that recorded nothing (a killed task) is requeued as before
    assert slurm.main(argv) == 137 and calls == ["srun", "srun", "scontrol"]


def test_jobs_queued_with_the_old_module_path_still_run_the_supervisor() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS_PER_NODE": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "coatnet_scale.distributed.slurm", "--hostfile"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout == "n1 slots=2\nn2 slots=2\n" and "launch/slurm/supervisor.py" in proc.stderr
