"""Training telemetry: TensorBoard scalars and the rank-0 progress bar."""

from __future__ import annotations

import logging
import os
import warnings

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


class Monitor:
    """Writes scalars to ``<output_dir>/tb/rank_<r>`` (rank 0 only for now) and drives a tqdm bar.

    Tags: ``train/loss``, ``train/loss/<task>``, ``train/samples_per_s``,
    ``val/<task>/<metric>`` (incl. ``oracle_*``).
    """

    def __init__(
        self, output_dir: str, rank: int, total_steps: int, progress_bar: bool = True
    ) -> None:
        self.rank = rank
        self.writer = (
            SummaryWriter(os.path.join(output_dir, "tb", f"rank_{rank}")) if rank == 0 else None
        )
        self.bar = (
            tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True)
            if rank == 0 and progress_bar
            else None
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

    def advance(self, steps: int, postfix: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def quiet_third_party_logs() -> None:
    """Silence known, harmless start-up chatter of torchrec / torch.fx / torchdata.

    Our own output (plan, progress, metrics) stays; real errors still surface.
    """
    for name in ("torchrec", "torch.fx._symbolic_trace", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # data_parallel tables: torchrec logs this per table on the root logger
    logging.getLogger().addFilter(lambda r: "Sharding spec not found" not in r.getMessage())
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    # fbgemm's dense (data_parallel) lookup; its gradients are checked in tests/distributed
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")
