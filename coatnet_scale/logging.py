"""Run logging: a JSONL metrics file (always), wandb (online / offline / disabled), and a console
progress bar with ETA on rank 0. Other ranks write nothing.

wandb: `auto` is online when an API key is configured and the wandb host answers, offline
otherwise. The run id is kept in RUN_DIR/wandb_run_id, so a resumed run continues the same wandb
run (`resume="allow"`); every record carries an explicit, increasing `step` so resumed segments do
not overlap (wandb drops records whose step goes backwards).

Secrets: values of environment variables whose names look secret (KEY, TOKEN, SECRET, PASSWORD)
are redacted from every string this module writes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from coatnet_scale.config import LoggingConfig

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
WANDB_HOST = ("api.wandb.ai", 443)


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    return sorted(
        (v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 8), key=len, reverse=True
    )


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every secret value from the environment replaced by ***."""
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, "***")
    return text


def redact_tree(value: Any) -> Any:
    """A config (nested dicts and lists) with `redact` applied to every string in it: what
    RUN/config.yaml and a checkpoint's trainer_state.json keep of the config."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(item) for item in value]
    return value


def resolve_wandb_mode(mode: str, env: Mapping[str, str] | None = None) -> str:
    """online / offline / disabled; `auto` means online only with a key and a reachable host."""
    if mode != "auto":
        return mode
    env = os.environ if env is None else env
    has_key = bool(env.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    if not has_key or env.get("WANDB_MODE") == "offline":
        return "offline"
    try:
        socket.create_connection(WANDB_HOST, timeout=2).close()
    except OSError:
        return "offline"
    return "online"


def rewind_metrics(path: Path, step: int) -> int:
    """After a resume from `step`: move records of later steps (logged by the run that died after
    its last checkpoint) from `path` to `<name>.rewound.jsonl`, so the metrics file holds one
    record per step again. Nothing is deleted. Returns how many records moved."""
    if not path.is_file():
        return 0
    text = path.read_text()
    kept, moved = [], []
    for line in text.splitlines():
        try:
            later = json.loads(line).get("step", 0) > step
        except ValueError:
            later = False  # a line cut by the kill: kept as it is
        (moved if later else kept).append(line)
    if moved:
        with open(path.with_suffix(".rewound.jsonl"), "a") as f:
            f.write("\n".join(moved) + "\n")
    if moved or not text.endswith("\n"):  # also ends a line cut by the kill
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(moved)


class ThroughputWindow:
    """Images, steps and time of the training steps since the last log: evaluation and checkpoint
    time inside the window is measured apart (`pause`) and left out, so img/s and MFU are training
    throughput, and the pauses are reported on their own.

    MFU counts `flops_per_image` (6 x the forward MACs: forward plus a backward of twice its
    cost) against `peak_flops`, the dense peak of all ranks together (None: not reported)."""

    def __init__(
        self, flops_per_image: float = 0.0, peak_flops: float | None = None, clock=time.perf_counter
    ) -> None:
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.steps, self.data_wait = self.clock(), 0, 0, 0.0
        self.paused: dict[str, float] = {}

    def step_done(self, images: int) -> None:
        self.images += images
        self.steps += 1

    def pause(self, what: str, seconds: float) -> None:
        self.paused[what] = self.paused.get(what, 0.0) + seconds

    def training_seconds(self) -> float:
        return self.clock() - self.start - sum(self.paused.values())

    def metrics(self) -> dict[str, float]:
        """img/s, seconds per step, the share of it spent waiting for data, and MFU."""
        elapsed = self.training_seconds()
        img_per_s = self.images / elapsed
        out = {
            "img_per_s": img_per_s,
            "step_time_s": elapsed / max(self.steps, 1),
            "data_wait_share": self.data_wait / elapsed,
        }
        if self.peak_flops:
            out["mfu"] = self.flops_per_image * img_per_s / self.peak_flops
        return out


class RunLogger:
    """Metrics sink of one rank (a no-op everywhere but rank 0). A run continued from
    `start_step` first moves the records a killed run logged after that step aside
    (`rewind_metrics`)."""

    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Path,
        is_main: bool,
        config: dict[str, Any],
        total_steps: int,
        start_step: int = 0,
        wandb_run_id: str | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.is_main = cfg, run_dir, is_main
        self.secrets = secret_values()
        self.wandb_run = None
        self._wandb_id: str | None = None
        self.progress = None
        if not is_main:
            return
        self.metrics_path = run_dir / "metrics.jsonl"
        rewound = rewind_metrics(self.metrics_path, start_step) if start_step else 0
        self.mode = resolve_wandb_mode(cfg.wandb_mode)
        if self.mode != "disabled":
            self.wandb_run = self._init_wandb(config, wandb_run_id)
            self._wandb_id = self.wandb_run.id
        self.progress = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if rewound:
            self.message(f"{rewound} metric records after step {start_step} moved aside")

    def _init_wandb(self, config: dict[str, Any], run_id: str | None):
        """The run id: the resumed checkpoint's, else the run folder's, else a new one."""
        import wandb

        id_file = self.run_dir / "wandb_run_id"
        if run_id is None:
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity,
            id=run_id,
            resume="allow",
            mode=self.mode,
            dir=str(self.run_dir),
            config=json.loads(redact(json.dumps(config), self.secrets)),
        )

    @property
    def wandb_run_id(self) -> str | None:
        """Kept after a wandb failure too: the checkpoint still names the run to continue."""
        return self._wandb_id

    def _wandb_failed(self, err: Exception) -> None:
        """wandb is a sink, not a dependency of the run: if it breaks (its service process killed
        by a signal sent to the whole process group, a network failure), the run goes on with the
        metrics file only."""
        self.wandb_run = None
        self.message(f"WARNING: wandb failed ({type(err).__name__}: {err}); metrics.jsonl only")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One record: appended to metrics.jsonl, sent to wandb, shown on the progress bar."""
        if not self.is_main:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        line = redact(json.dumps(record), self.secrets)
        with open(self.metrics_path, "a") as f:
            f.write(line + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(dict(metrics), step=step)
            except Exception as err:
                self._wandb_failed(err)
        if self.progress is not None:
            shown = {k: metrics[k] for k in ("loss", "lr", "img_per_s", "val_top1") if k in metrics}
            self.progress.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def rewind(self, step: int) -> None:
        """Training went back to `step` (a loss-spike rollback): later records move aside as
        after a resume (`rewind_metrics`), and the progress bar goes back. wandb keeps the first
        pass: it accepts no step below one it has."""
        if not self.is_main:
            return
        rewind_metrics(self.metrics_path, step)
        if self.progress is not None:
            self.progress.n = step
            self.progress.refresh()

    def advance(self, steps: int = 1) -> None:
        if self.progress is not None:
            self.progress.update(steps)

    def message(self, text: str) -> None:
        if self.is_main:
            (self.progress.write if self.progress is not None else print)(
                redact(text, self.secrets)
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception as err:
                self._wandb_failed(err)
