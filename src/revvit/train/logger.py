"""Run records in the output directory (rank 0 only): metrics.json / metrics.csv rewritten each epoch from
the full history (so a resumed run's files are whole), TensorBoard events, and curves.png."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

from ..io import atomic_write

__all__ = ["RunLogger"]


class RunLogger:
    def __init__(self, out_dir: Path, enabled: bool = True, purge_step: Optional[int] = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=purge_step)

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.tb is not None:
            self.tb.add_scalar("train/loss_step", loss, global_step)
            self.tb.add_scalar("train/lr", lr, global_step)

    def epoch(self, history: list[dict]) -> None:
        """Record the newest epoch of `history` and rewrite the JSON, CSV and plot from all of it."""
        if not self.enabled or not history:
            return
        row = history[-1]
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"epoch/{key}", value, row["epoch"])
        self.tb.flush()
        atomic_write(self.out_dir / "metrics.json", lambda f: f.write(json.dumps(history, indent=1).encode()))
        keys = list(dict.fromkeys(k for r in history for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
        atomic_write(self.out_dir / "metrics.csv", lambda f: f.write(buf.getvalue().encode()))
        self.plot(history)

    def plot(self, history: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in history]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
        ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
        if any("val_loss" in r for r in history):
            ax_loss.plot([r["epoch"] for r in history if "val_loss" in r],
                         [r["val_loss"] for r in history if "val_loss" in r], label="val")
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        ax_loss.legend()
        evals = [r for r in history if "val_top1" in r]
        ax_acc.plot([r["epoch"] for r in evals], [r["val_top1"] for r in evals], marker="o")
        ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation accuracy")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write(self.out_dir / "curves.png", lambda f: f.write(buf.getvalue()))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
