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


def job_attempts(
    tmp_path,
    monkeypatch,
    srun_codes: list[int],
    steps: list[int],
    job: str = "9",
    srun_errors: list[list[str]] | None = None,
    slurm_says: dict[str, str] | None = None,
    commands: list[list[str]] | None = None,
):
    """Run the supervisor once per attempt (restart i) with a fake srun exiting with
    `srun_codes[i]` after the run's newest checkpoint reached `steps[i]` and printing
    `srun_errors[i]` on its stderr; returns the exit codes and the commands. `slurm_says`: what
    `scontrol show job` and `sinfo` print ("show", "sinfo"); `commands` collects the whole
    command lines (but `scontrol show`/`write`)."""
    import os
    import subprocess

    from tests.data.conftest import shard_set
    from tests.unit.test_checkpoint_files import fake_checkpoint

    run = tmp_path / "run"
    calls: list[str] = []
    attempt = {"i": 0}
    says = slurm_says or {}

    def fake_run(command, **kwargs):
        if command[:2] in (["scontrol", "show"], ["scontrol", "write"]):
            return subprocess.CompletedProcess(command, 0, says.get("show", ""), "")
        if commands is not None:
            commands.append(command)
        if command[0] == "sinfo":
            return subprocess.CompletedProcess(command, 0, says.get("sinfo", ""), "")
        calls.append(command[0])
        if command[0] == "srun":
            step = steps[attempt["i"]]
            if step:
                fake_checkpoint(run / "checkpoints" / f"step{step:08d}", step)
            for line in (srun_errors or [[]] * len(srun_codes))[attempt["i"]]:
                os.write(kwargs["stderr"], f"{line}\n".encode())
            return subprocess.CompletedProcess(command, srun_codes[attempt["i"]])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(slurm.subprocess, "run", fake_run)
    allocation_env = {
        "SLURM_JOB_ID": job,
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_TASKS_PER_NODE": "1(x2)",
    }
    for key, value in allocation_env.items():
        monkeypatch.setenv(key, value)
    shards = tmp_path / "train_shards" / "train.json"
    shards = shards if shards.exists() else shard_set(tmp_path, [8])
    argv = ["--model", "coatnet_debug", f"data.train_shards={shards}"]
    argv += [f"train.run_dir={run}", "train.global_batch_size=8", "train.micro_batch_size=4"]
    argv += ["train.total_steps=100", "distributed.max_requeues=2"]
    codes = []
    for i in range(len(srun_codes)):
        attempt["i"] = i
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(i))
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


# What srun printed on the local cluster when the task on n2 exited with code 3 (SLURM 22.05).
N2_FAILED = [
    "srun: error: n2: task 1: Exited with exit code 3",
    "srun: launch/slurm: _step_signal: Terminating StepId=1.0",
    "slurmstepd-n1: error: *** STEP 1.0 ON n1 CANCELLED AT 2026-11-30T10:10:57 ***",
    "srun: error: n1: task 0: Terminated",
    "srun: Force Terminated StepId=1.0",
]


def test_the_first_task_srun_reports_as_failed_names_the_node() -> None:
    """With --kill-on-bad-exit srun kills the other tasks after the first failure and reports
    them too; only the first failed task's node is blamed."""
    assert slurm.first_task_failure(N2_FAILED) == slurm.NodeFailure(
        "n2", "task 1: Exited with exit code 3"
    )
    # a killed task first; the others' own errors (a broken collective) after it
    lines = [
        "Traceback (most recent call last):",  # a task's stderr passes through srun's
        "srun: error: gpu-a07: task 9: Killed",
        "srun: error: gpu-a01: tasks 0-7: Exited with exit code 1",
    ]
    assert slurm.first_task_failure(lines) == slurm.NodeFailure("gpu-a07", "task 9: Killed")
    # the same exit code from tasks on two nodes: a common cause (a bug), whichever came first
    # (what srun printed when one exception ended both ranks on the local cluster)
    both = ["srun: error: n1: task 0: Exited with exit code 1", *N2_FAILED[:1]]
    both[1] = both[1].replace("code 3", "code 1")
    assert slurm.first_task_failure(both) is None
    assert slurm.first_task_failure([*N2_FAILED[:1], both[0]]).node == "n2"  # 3, then 1
    oom = slurm.first_task_failure(["srun: error: n3: tasks 4,6: Out Of Memory"])
    assert oom == slurm.NodeFailure("n3", "tasks 4,6: Out Of Memory")
    # a first line over several nodes blames none (nor does a later line)
    assert slurm.first_task_failure(["srun: error: n[1-2]: tasks 0-1: Killed", *N2_FAILED]) is None
    assert slurm.first_task_failure(["srun: error: Unable to create step for job 5: busy"]) is None
    assert slurm.first_task_failure([]) is None


def test_srun_stderr_passes_through_and_its_error_lines_are_kept(capsys) -> None:
    """The job log still gets everything srun and the tasks print, byte for byte; only lines
    that begin with srun's error prefix are kept, not a task's long line that contains one."""
    import sys

    long_line = "x" * 10_000 + "srun: error: n9: task 0: Killed"
    script = (
        "import sys; w = sys.stderr.write; "
        f"w('progress\\r{long_line}\\n'); "
        "w('srun: error: n2: task 1: Exited with exit code 1\\nlast, no newline')"
    )
    returncode, errors = slurm.run_step([sys.executable, "-c", script])
    assert returncode == 0
    assert errors == ["srun: error: n2: task 1: Exited with exit code 1"]
    err = capsys.readouterr().err
    assert err == (
        f"progress\r{long_line}\nsrun: error: n2: task 1: Exited with exit code 1\nlast, no newline"
    )


def test_a_stalled_rank_is_blamed_on_its_own_node(tmp_path) -> None:
    """The watchdog's record names the stalled rank and the host it saw; another rank writes it,
    and srun's first failed task is that writer, not the stalled rank."""
    import json

    from coatnet_scale.exits import EXIT_STALLED

    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)"}
    record = {"code": EXIT_STALLED, "line": "stall: rank 3", "rank": 3, "host": "n2.example.org"}
    assert slurm.stall_failure(record, env) == slurm.NodeFailure("n2", "rank 3 stalled")
    # every node's hostname the same (the local test cluster): the rank's place in the layout
    assert slurm.stall_failure(record | {"host": "vm"}, env).node == "n2"
    assert slurm.stall_failure(record | {"host": "vm", "rank": 1}, env).node == "n1"
    assert (
        slurm.stall_failure(record | {"host": "vm"}, env | {"SLURM_DISTRIBUTION": "cyclic"}) is None
    )
    assert slurm.tasks_per_node("2(x3),1") == [2, 2, 2, 1]

    (tmp_path / "exit_reason.json").write_text(json.dumps(record))
    reporter = ["srun: error: n1: task 0: Exited with exit code 7"]
    assert slurm.attempt_failure(tmp_path, reporter, env).node == "n2"
    (tmp_path / "exit_reason.json").unlink()
    assert slurm.attempt_failure(tmp_path, reporter, env).node == "n1"


def test_a_node_is_bad_after_failing_two_attempts_of_the_job_in_a_row() -> None:
    A = slurm.Attempt
    failed = A("9", 4, "n2", "task 1: Killed")
    assert slurm.repeated_failure(A("9", 3, "n2", "task 1: Killed"), failed) == "n2"
    assert slurm.repeated_failure(A("9", 3, "n5", "task 6: Killed"), failed) is None
    assert slurm.repeated_failure(A("9", 3), failed) is None  # the attempt before went well
    assert slurm.repeated_failure(A("9", 2, "n2"), failed) is None  # restart 3 left no record
    assert slurm.repeated_failure(A("8", 3, "n2"), failed) is None  # another job
    assert slurm.repeated_failure(None, failed) is None
    assert slurm.repeated_failure(A("9", 3, "n2"), A("9", 4)) is None


def test_the_attempts_record_survives_across_attempts_and_stays_short(tmp_path) -> None:
    attempts = [slurm.Attempt("9", i, f"n{i % 3}", "task 1: Killed") for i in range(30)]
    slurm.write_attempts(tmp_path, attempts)
    assert slurm.read_attempts(tmp_path) == attempts[-slurm.KEEP_ATTEMPTS :]
    (tmp_path / slurm.NODE_FAILURES_FILE).write_text("{not json")
    assert slurm.read_attempts(tmp_path) == []


def test_an_exclusion_adds_to_the_jobs_own_and_never_strands_the_job() -> None:
    three = {"n1", "n2", "n3"}
    assert slurm.exclusion("n2", [], three, 2) == (("n2",), "")
    eight = {f"n{i}" for i in range(1, 9)}
    assert slurm.exclusion("n2", ["n5"], eight, 2) == (("n5", "n2"), "")
    new, why = slurm.exclusion("n2", ["n3"], three, 2)
    assert new == () and "needs 2 node(s)" in why and "leave 1 of its partitions' 3" in why
    assert slurm.exclusion("n2", [], set(), 2)[0] == ()  # nodes unknown: no blind exclusion


BAD_N2 = slurm.BadNode("n2", "it failed two attempts in a row (...)", ("n2",))


def test_a_bad_node_is_excluded_before_the_no_progress_stop() -> None:
    """The second failed attempt on n2 also reaches max_requeues=2 without a checkpoint: the job
    is requeued without n2 once more; the count goes on, so the next attempt that fails without
    a checkpoint stops the job."""
    decision = decide(1, 40, 40, stalled=1, limit=2)
    assert decision.action == "stop"  # without the bad node
    decision = slurm.decide(1, 40, 40, 100, 1, 2, BAD_N2)
    assert decision.requeue and decision.exclude == ("n2",) and decision.stalled == 2
    assert "node n2 is excluded from the requeued job (ExcNodeList=n2)" in decision.message
    assert "before the no-progress stop (2 attempt(s) in a row" in decision.message
    assert decide(137, 40, 40, stalled=2, limit=2).action == "stop"
    # what a requeue cannot fix stops anyway; a stop signal or a finished run excludes nothing
    from coatnet_scale.exits import EXIT_DATA

    assert slurm.decide(EXIT_DATA, 40, 40, 100, 0, 3, BAD_N2).action == "stop"
    assert slurm.decide(EXIT_STOPPED, 40, 40, 100, 0, 3, BAD_N2).exclude == ()
    assert slurm.decide(1, 40, 100, 100, 0, 3, BAD_N2).action == "finished"
    # with the default limit two failed attempts in a row are requeued anyway
    from coatnet_scale.config import DistributedConfig

    assert DistributedConfig().max_requeues >= 2


def test_two_attempts_failing_on_one_node_requeue_the_job_without_it(
    tmp_path, monkeypatch, capsys
) -> None:
    """Restarts 0 and 1 fail on n2 (max_requeues=2: the second would stop the job): requeued,
    then requeued with n2 added to the job's ExcNodeList; restart 2 fails on n1 too: stopped."""
    commands: list[list[str]] = []
    n1_failed = ["srun: error: n1: task 0: Exited with exit code 1"]
    codes, _ = job_attempts(
        tmp_path,
        monkeypatch,
        [1, 143, 1],
        [0, 0, 0],
        srun_errors=[N2_FAILED, N2_FAILED, n1_failed],
        slurm_says={"show": "JobId=9 Partition=debug ExcNodeList=n7", "sinfo": "n1\nn2\nn3\nn7\n"},
        commands=commands,
    )
    assert codes == [1, 143, 1]
    update = ["scontrol", "update", "JobId=9", "ExcNodeList=n7,n2"]
    assert [c for c in commands if c[0] != "srun"] == [
        ["scontrol", "requeue", "9"],
        ["sinfo", "-h", "-N", "-o", "%N", "--partition=debug"],
        ["scontrol", "requeue", "9"],
        update,  # after the requeue: refused while the job runs
    ]
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "is excluded" in x)
    assert "node n2 is excluded from the requeued job (ExcNodeList=n7,n2): it failed two " in line
    assert "(restart 0: task 1: Exited with exit code 3; restart 1: task 1: Exited" in line
    assert "not requeueing: 3 attempt(s) in a row ended without a new checkpoint" in out
    recorded = slurm.read_attempts(tmp_path / "run")
    assert [(a.restart, a.node) for a in recorded] == [(0, "n2"), (1, "n2"), (2, "n1")]


def test_a_node_whose_exclusion_would_strand_the_job_stays_with_a_line_saying_so(
    tmp_path, monkeypatch, capsys
) -> None:
    commands: list[list[str]] = []
    codes, calls = job_attempts(
        tmp_path,
        monkeypatch,
        [1, 1],
        [10, 20],  # progress: requeued both times
        srun_errors=[N2_FAILED, N2_FAILED],
        slurm_says={"show": "JobId=9 Partition=debug ExcNodeList=(null)", "sinfo": "n1\nn2\n"},
        commands=commands,
    )
    assert codes == [1, 1] and calls == ["srun", "scontrol", "srun", "scontrol"]
    assert not any(c[:2] == ["scontrol", "update"] for c in commands)
    out = capsys.readouterr().out
    assert (
        "node n2 failed two attempts in a row but is not excluded: the job needs 2 node(s) and "
        "excluding it would leave 1 of its partitions' 2, so the job could never start again"
    ) in out


def test_failures_on_one_node_with_a_good_attempt_between_exclude_nothing(
    tmp_path, monkeypatch, capsys
) -> None:
    commands: list[list[str]] = []
    job_attempts(
        tmp_path,
        monkeypatch,
        [1, 0, 1],
        [0, 10, 0],
        srun_errors=[N2_FAILED, [], N2_FAILED],
        slurm_says={"sinfo": "n1\nn2\nn3\n"},
        commands=commands,
    )
    assert [c[0] for c in commands] == ["srun", "scontrol"] * 3  # requeues only
    recorded = slurm.read_attempts(tmp_path / "run")
    assert [a.node for a in recorded] == ["n2", None, "n2"]
