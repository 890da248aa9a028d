"""Evaluate a CE-FAM checkpoint against the shapes world's masks: ``python evaluate.py --checkpoint CKPT``."""

from cefam_lightning.cli.evaluate import main

if __name__ == "__main__":
    main()
