"""Benchmarks. Each prints its figures next to a baseline measured in the same run.

* ``python -m mtl_dist.tools.bench.training`` (``mtl-bench``): the reader against pyarrow, training
  samples/s per process count, the cost of gate monitoring.
* ``python -m mtl_dist.tools.bench.heads``: every dense head's forward+backward against a loop MMoE.
* ``python -m mtl_dist.tools.bench.peers`` (e2e's baselines): one peer's MMoE (torch-rechub or
  DeepCTR-Torch) trained through its own API; speed, peak RSS and test AUC as JSON.
* ``python -m mtl_dist.tools.bench.e2e``: end to end against torch-rechub and DeepCTR-Torch.
* ``python -m mtl_dist.tools.bench.quality``: test AUC ± std over seeds, ours with each head and
  interaction option against the peers' MMoE on three workloads, with samples/s.
"""
