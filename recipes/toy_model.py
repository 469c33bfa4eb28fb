"""The paper's toy model (PAPER.md section 2): figure 1 (one weight) and figure 4 (two weights) as PNGs.

python recipes/toy_model.py --output_dir outputs/toy
"""

import argparse
import sys
from pathlib import Path

import torch

from hf_oscq.scripts.toy import toy_trajectory
from hf_oscq.training.figures import plot_toy_one_weight, plot_toy_two_weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/toy")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning_rate", type=float, default=0.05)
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    settings = {"steps": args.steps, "learning_rate": args.learning_rate}
    one = {method: toy_trajectory((0.75,), method=method, **settings).numpy() for method in ("qat", "fp")}
    plot_toy_one_weight(one, output / "toy_one_weight.png", optimum=0.75)
    two = {
        method: toy_trajectory((0.75, 0.3), method=method, **settings).numpy()
        for method in ("qat", "oscillation", "fp")
    }
    plot_toy_two_weights(two, output / "toy_two_weights.png", optimum=(0.75, 0.3))
    late = torch.round(torch.tensor(one["qat"][args.steps // 2 :, 0])).mean().item()
    sys.stdout.write(f"QAT: late-step mean of q(w) = {late:.3f} (optimum 0.75). Figures in {output}\n")
    return 0


if __name__ == "__main__":
    from hf_oscq.errors import exit_code  # bad input: one line, exit 1

    raise SystemExit(exit_code("toy_model.py", main))
