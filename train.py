"""Train and evaluate ViTs: one LightningCLI (`training.cli.ViTCLI`); the study is `python -m training.study`.

    python train.py fit   --config configs/fashion_mnist.yaml            # train
    python train.py test  --config runs/fashion_mnist/config.yaml \
        --ckpt_path runs/fashion_mnist/checkpoints/last.ckpt --model.eval_resolutions "[20, 28, 36, 44]"
"""

from training.cli import cli_main

if __name__ == "__main__":
    cli_main()
