"""The noise floor estimated from the likelihood against the ground truth's own data residual, on every task.

    python benchmarks/noise_floor.py            # writes benchmarks/results/noise_floor.md

``metrics.noise_floor`` sees only the measurement and its noise model; the benchmark's floor column
(``data_residual`` of the ground truth) is what it has to predict.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import recon  # noqa: E402

from napari_diffrecon.metrics import data_residual, noise_floor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "noise_floor.md"))
    a = p.parse_args(argv)
    lines = ["# Noise floor: estimate from the likelihood vs the ground truth's residual", "",
             "`python benchmarks/noise_floor.py` (the tasks of `benchmarks/recon.py`, 128², seed 0).", "",
             "| task | likelihood | truth's residual | estimate | ratio |", "|---|---|---|---|---|"]
    for task in recon.TASKS:
        m = recon.build_task(task)
        op, lik, y = m.build_operator(), m.build_likelihood(), m.to_tensor()
        truth = float(data_residual(op, torch.as_tensor(m.ground_truth), y, lik))
        est = noise_floor(op, y, lik)
        lines.append(f"| {task} | {type(lik).__name__} | {truth:.4f} | {est:.4f} | {est / truth:.3f} |")
        print(lines[-1], flush=True)
    Path(a.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
