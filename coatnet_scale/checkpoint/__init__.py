"""Crash-safe sharded checkpoints: save, commit, verify, keep, resume (also on another number of
ranks), export, and initial weights for fine-tuning.

Layout of RUN/checkpoints/
--------------------------
    step00001200/                 a committed checkpoint
        mp_rank_00_model_states.pt, zero_pp_rank_R_mp_rank_00_optim_states.pt
                                  DeepSpeed's sharded files (engine.save_checkpoint)
        trainer_state.json        step, data position, counters, wandb run id, world size, the
                                  resolved config and its hash, the code version
        rng/rank00000.pt          each rank's RNG states (python, numpy, torch, accelerator)
        ema.safetensors           the fp32 EMA of the BatchNorm statistics (and of the weights
                                  under ZeRO-0); the weights' EMA is optimizer state, in
                                  DeepSpeed's files next to Adam's moments (when EMA is on)
        manifest.json             every file above with its size and SHA-256; written last
        universal/                DeepSpeed universal checkpoint, made on demand when a run
                                  resumes on another number of ranks
    latest                        name of the newest committed checkpoint (for DeepSpeed's tools)
    .tmp-step00001300/            a save in progress (or killed): rolled forward if its manifest
                                  verifies, deleted otherwise, at the next start
    step00001100.damaged          failed verification at a resume; kept for inspection

The commit protocol (DeepSpeed alone writes `latest` before every rank has finished writing)
-------------------------------------------------------------------------------------------
1. every rank writes its DeepSpeed shards and RNG state into `.tmp-stepN/` (DeepSpeed's own
   `latest` is switched off), rank 0 adds the trainer state and the EMA;
2. barrier, then the ranks checksum (and fsync) the files between them, and rank 0 writes
   `manifest.json` atomically: that is the commit point;
3. rank 0 renames `.tmp-stepN` to `stepN` (atomic) and rewrites `latest` atomically;
4. old checkpoints beyond the retention policy are renamed away, then deleted.

Readers never trust names alone: a resume takes the newest `stepN` whose manifest verifies (sizes
always, checksums by default, the work spread over the ranks) and falls back to the previous one,
with a warning, when the newest is damaged. A kill at any moment leaves either the previous state
or a verifiable new checkpoint.

Changing the number of ranks runs DeepSpeed's `ds_to_universal` on rank 0 into
`stepN/universal/` and loads that with `checkpoint.load_universal`; the data position, the EMA and
the counters are world-size independent by construction.

Modules: `layout` (names, listing, manifest verification, the collectives used), `state` (trainer
state and RNG), `save` (the commit protocol, retention, recovery), `resume` (choice, compatibility,
universal conversion, loading), `export` (consolidated weights, fine-tuning init). The command
line, `python -m coatnet_scale.checkpoint {list,verify,export}`, is in `__main__`.
"""

from coatnet_scale.checkpoint.ema_files import partitioned_ema_weights, read_ema
from coatnet_scale.checkpoint.export import (
    consolidated_state_dict,
    export,
    resolve_checkpoint,
)
from coatnet_scale.checkpoint.layout import (
    EMA_FILE,
    EXPORT_CONFIG,
    LATEST,
    MANIFEST,
    RNG_DIR,
    TRAINER_STATE,
    UNIVERSAL,
    CheckpointError,
    checkpoint_root,
    checkpoint_step,
    code_version,
    files_under,
    list_checkpoints,
    read_manifest,
    step_name,
    verify,
    verify_on_ranks,
)
from coatnet_scale.checkpoint.resume import (
    ConfigChanges,
    LoadPlan,
    Resume,
    check_compatible,
    config_changes,
    convert_to_universal,
    find_resume,
    load,
    newest_valid,
    prepare_load,
    restore_rng,
)
from coatnet_scale.checkpoint.save import (
    BackgroundSaver,
    file_records,
    point_latest,
    publish,
    recover,
    retention,
    save,
    write_manifest,
)
from coatnet_scale.checkpoint.state import TrainerState, rng_state, set_rng_state

__all__ = [
    "BackgroundSaver",
    "EMA_FILE",
    "EXPORT_CONFIG",
    "LATEST",
    "MANIFEST",
    "RNG_DIR",
    "TRAINER_STATE",
    "UNIVERSAL",
    "CheckpointError",
    "LoadPlan",
    "Resume",
    "TrainerState",
    "ConfigChanges",
    "check_compatible",
    "checkpoint_root",
    "checkpoint_step",
    "code_version",
    "config_changes",
    "consolidated_state_dict",
    "convert_to_universal",
    "export",
    "file_records",
    "files_under",
    "find_resume",
    "list_checkpoints",
    "load",
    "newest_valid",
    "point_latest",
    "partitioned_ema_weights",
    "prepare_load",
    "publish",
    "read_ema",
    "read_manifest",
    "recover",
    "resolve_checkpoint",
    "restore_rng",
    "retention",
    "rng_state",
    "save",
    "set_rng_state",
    "step_name",
    "verify",
    "verify_on_ranks",
    "write_manifest",
]
