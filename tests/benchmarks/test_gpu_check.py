"""benchmarks/gpu_check.sh's CPU path (GPU_CHECK_CPU=1, tiny sizes): every part runs and prints."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_path_runs_every_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(GPU_CHECK_CPU="1", TMPDIR=str(tmp_path), GPU_CHECK_SITE=str(tmp_path / "site"))
    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1000,
    )
    text = out.stdout
    assert out.returncode == 0, (text + out.stderr)[-3000:]
    device = [line for line in text.splitlines() if line.startswith("DEVICE jax ")]
    assert len(device) == 1 and device[0].endswith("(cpu)")
    for part in ("throughput", "generative", "quality"):
        assert f"PART {part} (limit" in text
    assert "[1/2] sasrec d16 sampled_softmax float32:" in text  # a row as soon as it is measured
    assert "| onerec | 16 | sampled_softmax | float32 |" in text  # then the table
    assert 'TRAIN {"variant": "onerec_sid"' in text and 'EVAL {"variant": "onerec_sid"' in text
    assert "test: HR@10" in text and "NDCG@10" in text
    assert text.rstrip().splitlines()[-1].startswith("DONE in") and "status 0" in text
