"""The README's main command (the model demo) runs end to end."""

import math

from launch.model_demo import main


def test_model_demo_runs_a_training_step(capsys) -> None:
    result = main(
        [
            "--model",
            "coatnet_debug",
            "--batch-size",
            "2",
            "precision.dtype=fp32",
            "activation_checkpointing.policy=all",
        ]
    )
    assert math.isfinite(result["loss"])
    out = capsys.readouterr().out
    assert "coatnet7" in out and "2,441,972,728" in out
    assert "checkpointed stages ['s1', 's2', 's3', 's4', 'stem']" in out
