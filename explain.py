"""Entry point: ``python explain.py --checkpoint CKPT [options] INPUT [INPUT ...]`` (see ``--help``)."""

from cefam_lightning.cli.explain import main

if __name__ == "__main__":
    main()
