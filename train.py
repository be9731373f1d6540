"""Train, evaluate and compare ViTs.

    python train.py fit   --config configs/fashion_mnist.yaml            # train (LightningCLI)
    python train.py test  --config runs/fashion_mnist/config.yaml \
        --ckpt_path runs/fashion_mnist/checkpoints/last.ckpt --model.eval_resolutions "[20, 28, 36, 44]"
    python train.py study --config configs/study_fashion_mnist.yaml      # the position-encoding study
"""

import sys

from training.cli import cli_main
from training.study import study_main

if __name__ == "__main__":
    if sys.argv[1:2] == ["study"]:
        study_main(sys.argv[2:])
    else:
        cli_main()
