"""The converged-quality benchmark (issue 30): one early-stopping rule for every system, on a
validation file that is not the test file, the best epoch's test AUC reported."""

import math

import numpy as np

from mtl_dist.tools.bench import converged
from mtl_dist.tools.bench.peer_models import PeerModel
from mtl_dist.tools.bench.peers import TASKS, peers_installed, train_to_best


def scripted_peer(quality: list[float], n: int = 4000) -> tuple[PeerModel, tuple, tuple]:
    """A model whose epoch e predicts labels + noise / quality[e]: its AUC rises and falls as
    ``quality`` does (the rule is what is tested, not a toolkit)."""
    rng = np.random.default_rng(0)
    y = (rng.random((n, len(TASKS))) < 0.3).astype(np.float32)
    noise = rng.normal(size=(n, len(TASKS)))
    epoch = {"e": -1}

    def predict(x):
        return x["y"] + noise / quality[epoch["e"]]

    model = PeerModel(lambda: epoch.update(e=epoch["e"] + 1), predict, "scripted")
    return model, ({"y": y}, y), ({"y": y}, y)


def test_train_to_best_stops_after_patience_and_keeps_the_best_epoch():
    model, val, test = scripted_peer([0.5, 2.0, 1.0, 0.8, 3.0, 3.0])
    _, history, best = train_to_best(model, val, test, max_epochs=6, patience=2)
    assert best == 2 and len(history) == 4  # epochs 3 and 4 did not improve: stopped there
    aucs = [h["val_auc"][TASKS[0]] for h in history]
    assert aucs[1] == max(aucs) and aucs[0] < aucs[1]


def test_train_to_best_runs_every_epoch_while_it_improves():
    model, val, test = scripted_peer([0.5, 1.0, 2.0])
    _, history, best = train_to_best(model, val, test, max_epochs=3, patience=1)
    assert best == 3 and len(history) == 3


def test_converged_only_when_the_patience_rule_ended_the_run():
    run = {"auc": dict.fromkeys(TASKS, 0.7), "first_epoch_auc": dict.fromkeys(TASKS, 0.7),
           "samples_per_s": 1.0}  # fmt: skip
    stopped = [{**run, "epochs": 4, "best_epoch": 2}]
    out_of_epochs = [{**run, "epochs": 6, "best_epoch": 5}]  # best near the end: not done
    assert converged.summarize(stopped, patience=2)["converged"]
    assert not converged.summarize(out_of_epochs, patience=2)["converged"]


def test_leads_need_a_gap_beyond_both_stds():
    ours = {"auc": {"click": (0.760, 0.002), "purchase": (0.800, 0.010)}}
    peer = {"auc": {"click": (0.750, 0.003), "purchase": (0.795, 0.001)}}
    assert converged.leads(ours, peer, seeds=3) == {"click": "lead", "purchase": "tie"}
    assert set(converged.leads(ours, peer, seeds=1).values()) == {"one seed: no verdict"}
    assert converged.mean_std([0.7, math.nan]) != converged.mean_std([0.7, 0.7])  # NaN stays NaN


def test_converged_bench_end_to_end(tmp_path):
    """Ours (and one installed peer) on a tiny workload: disjoint validation and test files, the
    best epoch is the validation maximum, its test AUC is what is reported."""
    peer = next((p for p, ok in peers_installed().items() if ok), None)
    args = [
        "--rows", "12000", "--test-rows", "6000", "--seeds", "1", "--max-epochs", "2",
        "--patience", "1", "--threads", "1", "--batch", "1024", "--peers", peer or "none",
        "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = converged.main(args)
    val_file, test_file = result["files"]
    assert val_file != test_file
    for name, runs in result["runs"].items():
        run = runs[0]
        assert 1 <= run["best_epoch"] <= run["epochs"] <= 2, name
        history = run["val_auc_history"]
        assert history[run["best_epoch"] - 1] == max(history), name
        assert all(0.5 < run["auc"][t] < result["oracle_auc"][t] for t in TASKS), (name, run)
        if "test_auc_history" in run:  # a peer: the reported AUC is its best epoch's test AUC
            assert run["auc"] == run["test_auc_history"][run["best_epoch"] - 1]
    assert (tmp_path / "out" / "converged.md").read_text().count("|") > 20
    # --resume keeps every finished run (nothing trains again: the same records)
    again = converged.main([*args, "--resume"])
    assert again["runs"] == result["runs"]
