"""Issue 24: sample weights are a weighted mean — uniform weights of three scales (1, 0.01 and
1/40,000, as normalised importance weights come) train the same model, under torchrun with 2
ranks. Before the fix the loss was Σ w·l / Σ m: at w = 1/40,000 it shrank 640-fold and the run
learned next to nothing."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import ROOT, torchrun


def _weighted_config(tmp_path):
    text = (ROOT / "configs" / "default.toml").read_text()
    text = text.replace('name = "click"\n', 'name = "click"\nsample_weight = "w"\n')
    text = text.replace('name = "conversion"\n', 'name = "conversion"\nsample_weight = "w"\n')
    path = tmp_path / "weighted.toml"
    path.write_text(text)
    return path


def test_uniform_weights_of_three_scales_train_the_same_model(synth_data, tmp_path):
    config = _weighted_config(tmp_path)
    results = {}
    for scale in (1.0, 0.01, 1 / 40_000):
        train = tmp_path / f"train_{scale}"
        train.mkdir()
        for path in sorted((synth_data / "train").glob("*.parquet"))[:2]:
            t = pq.read_table(path)
            pq.write_table(t.append_column("w", pa.array([scale] * t.num_rows, pa.float64())),
                           train / path.name)  # fmt: skip
        out = tmp_path / f"run_{scale}"
        proc = torchrun([
            "-m", "mtl_dist.train", "--config", str(config), "--data.train_path", str(train),
            "--data.val_path", str(synth_data / "val"), "--train.output_dir", str(out),
            "--train.progress_bar", "false", "--train.batch_size", "256",
            "--train.max_steps", "150", "--monitor.gate_every", "0",
        ])  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[scale] = json.loads((out / "metrics.json").read_text())["metrics"]
    base = results[1.0]
    assert base["click"]["auc"] > 0.6  # it learned
    for scale, m in results.items():
        for task in ("click", "conversion"):
            # float rounding of Σ w·l / Σ w differs by scale; the models stay the same
            assert math.isclose(m[task]["auc"], base[task]["auc"], abs_tol=2e-3), (scale, task)
        assert math.isclose(m["watch_time"]["mse"], base["watch_time"]["mse"], rel_tol=1e-2), scale
