"""Entry point: ``python train.py [--config FILE] [key=value ...]``. With no arguments, runs the shapes-world demo."""

from cefam_lightning.cli.train import main

if __name__ == "__main__":
    main()
