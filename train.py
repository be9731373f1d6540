"""Train, evaluate and compare ViTs: one LightningCLI (`training.cli.ViTCLI`).

    python train.py fit   --config configs/fashion_mnist.yaml            # train
    python train.py test  --config runs/fashion_mnist/config.yaml \
        --ckpt_path runs/fashion_mnist/checkpoints/last.ckpt --model.eval_resolutions "[20, 28, 36, 44]"
    python train.py study --config configs/study_fashion_mnist.yaml      # the position-encoding study
"""

from training.cli import cli_main

if __name__ == "__main__":
    cli_main()
