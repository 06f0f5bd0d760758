"""The SLURM batch-step logic without a cluster: requeue decisions by progress, the srun command
line, config validation and the run folder's owner checked before anything starts. (Real jobs:
tests/slurm.)"""

from __future__ import annotations

from coatnet_scale.distributed import slurm as allocation
from coatnet_scale.exits import EXIT_FOLDER_BUSY, EXIT_SETUP, EXIT_STOPPED, NOT_REQUEUED
from launch.slurm import supervisor as slurm


def decide(returncode: int, before: int, after: int, stalled: int = 0, limit: int = 3):
    return slurm.decide(returncode, before, after, 100, stalled, limit)


def test_a_run_whose_checkpoint_reached_the_last_step_is_finished() -> None:
    decision = decide(0, 90, 100)
    assert decision.action == "finished" and not decision.requeue  # typed, not a message
    # Even if a task was killed during teardown after the final checkpoint.
    assert not decide(143, 90, 100).requeue


def test_a_run_that_progresses_is_requeued_however_often_it_is_stopped() -> None:
    """A campaign of dozens of time-limit slices: each attempt that checkpoints new steps resets
    the count; the number of restarts is not capped."""
    stalled = 0
    for attempt in range(50):
        decision = decide(0, attempt, attempt + 1, stalled)
        assert decision.requeue and decision.stalled == 0, decision.message
        stalled = decision.stalled
    assert "step 49 -> 50" in decision.message
    assert "stopped after a checkpoint at step 50" in decision.message
    assert decide(EXIT_STOPPED, 40, 41).requeue
    failed = decide(137, 40, 44)
    assert failed.requeue and "exit code 137" in failed.message and "task N" in failed.message


def test_attempts_without_a_new_checkpoint_stop_after_the_limit() -> None:
    """A failure that recurs (or a warning signal that leaves no time to train) ends after
    distributed.max_requeues attempts in a row, with the reason."""
    first = decide(137, 40, 40, stalled=0)
    assert first.requeue and first.stalled == 1 and "no new checkpoint (1)" in first.message
    second = decide(137, 40, 40, stalled=1)
    assert second.requeue and second.stalled == 2
    third = decide(0, 40, 40, stalled=2)
    assert third.action == "stop" and third.stalled == 3
    assert "3 attempt(s) in a row ended without a new checkpoint" in third.message
    assert "distributed.max_requeues=3" in third.message
    assert decide(137, 40, 44, stalled=2).stalled == 0  # progress resets the count
    assert not decide(1, 0, 0, limit=0).requeue  # max_requeues=0: never requeue


def test_tasks_that_could_not_start_are_not_requeued() -> None:
    """A device error or a config error (exit 2 from every task) fails the same way again:
    requeueing it only burns allocations."""
    decision = decide(EXIT_SETUP, 40, 40, limit=10)
    assert not decision.requeue and "could not start" in decision.message
    for code in NOT_REQUEUED:  # data, checkpoint and non-finite errors recur the same way
        assert not decide(code, 30, 40, limit=10).requeue
    assert decide(1, 40, 40, limit=10).requeue


def test_progress_comes_from_the_newest_complete_checkpoint(tmp_path) -> None:
    from tests.unit.test_checkpoint_files import fake_checkpoint

    root = tmp_path / "checkpoints"
    assert allocation.newest_step(tmp_path) == 0
    fake_checkpoint(root / "step00000010", 10)
    fake_checkpoint(root / "step00000020", 20, commit=False)  # no manifest: not complete
    assert allocation.newest_step(tmp_path) == 10


def test_srun_runs_the_entry_point_with_the_same_arguments() -> None:
    argv = ["--model", "coatnet6", "optim.lr=1e-3"]
    command = slurm.srun_command("/py", argv, {})
    assert command[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert command[-4:] == [str(slurm.PRETRAIN), "--model", "coatnet6", "optim.lr=1e-3"]
    assert str(slurm.PRETRAIN).endswith("launch/pretrain.py") and slurm.PRETRAIN.is_file()
    assert not any(arg.startswith("--cpus-per-task") for arg in command)


def test_srun_passes_the_allocations_cpus_per_task_on() -> None:
    """srun >= 22.05 does not inherit sbatch's --cpus-per-task: each task would get one CPU."""
    command = slurm.srun_command("/py", [], {"SLURM_CPUS_PER_TASK": "12"})
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
        if command[:2] in (["scontrol", "show"], ["scontrol", "write"]):
            return subprocess.CompletedProcess(command, 0, "", "")  # no job: nothing to check
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


def job_attempts(tmp_path, monkeypatch, srun_codes: list[int], steps: list[int], job: str = "9"):
    """Run the supervisor once per attempt with a fake srun exiting with `srun_codes[i]` after
    the run's newest checkpoint reached `steps[i]`; returns the exit codes and the commands."""
    import subprocess

    from tests.data.conftest import shard_set
    from tests.unit.test_checkpoint_files import fake_checkpoint

    run = tmp_path / "run"
    calls: list[str] = []
    attempt = {"i": 0}

    def fake_run(command, **kwargs):
        if command[:2] in (["scontrol", "show"], ["scontrol", "write"]):
            return subprocess.CompletedProcess(command, 0, "", "")  # no job: nothing to check
        calls.append(command[0])
        if command[0] == "srun":
            step = steps[attempt["i"]]
            if step:
                fake_checkpoint(run / "checkpoints" / f"step{step:08d}", step)
            return subprocess.CompletedProcess(command, srun_codes[attempt["i"]])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(slurm.subprocess, "run", fake_run)
    for key, value in {"SLURM_JOB_ID": job, "SLURM_NTASKS": "2"}.items():
        monkeypatch.setenv(key, value)
    shards = tmp_path / "train_shards" / "train.json"
    shards = shards if shards.exists() else shard_set(tmp_path, [8])
    argv = ["--model", "coatnet_debug", f"data.train_shards={shards}"]
    argv += [f"train.run_dir={run}", "train.global_batch_size=8", "train.micro_batch_size=4"]
    argv += ["train.total_steps=100", "distributed.max_requeues=2"]
    codes = []
    for i in range(len(srun_codes)):
        attempt["i"] = i
        codes.append(slurm.main(argv))
    return codes, calls


def test_the_stall_count_carries_over_requeues_and_stops_the_job(
    tmp_path, monkeypatch, capsys
) -> None:
    """Attempts 1-2 checkpoint new steps, 3-4 crash without one: requeued, requeued, requeued,
    then stopped (max_requeues=2 in a row), each decision read from the run folder."""
    codes, calls = job_attempts(tmp_path, monkeypatch, [0, 0, 137, 137], [10, 20, 0, 0])
    assert codes == [1, 1, 137, 137]
    assert calls == ["srun", "scontrol", "srun", "scontrol", "srun", "scontrol", "srun"]
    out = capsys.readouterr().out
    assert "step 0 -> 10" in out and "step 10 -> 20" in out and "no new checkpoint (1)" in out
    assert "2 attempt(s) in a row ended without a new checkpoint" in out
    # the cause fixed, the same command submitted again: a new job starts its count from 0
    codes, calls = job_attempts(tmp_path, monkeypatch, [137], [0], job="10")
    assert codes == [137] and calls == ["srun", "scontrol"]


def test_a_folder_another_live_run_owns_fails_the_job_before_srun(
    tmp_path, monkeypatch, capsys
) -> None:
    import subprocess
    import sys

    from coatnet_scale.lease import Lease

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        lease = Lease.take(run, print)  # held by this process, under another SLURM job
        owner = lease.owner
        lease.release()
        import json
        from dataclasses import asdict

        (run / "owner.json").write_text(
            json.dumps(asdict(owner) | {"pid": other.pid, "job": "1234"})
        )
        codes, calls = job_attempts(tmp_path, monkeypatch, [0], [10])
        assert codes == [EXIT_FOLDER_BUSY] and calls == []
        out = capsys.readouterr().out
        assert f"is in use by another run (pid {other.pid} on " in out and "job 1234" in out
    finally:
        other.kill()


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
