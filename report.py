"""Entry point: ``python report.py --checkpoint CKPT [--data SOURCE] [--out DIR]`` (see ``--help``)."""

from cefam_lightning.cli.report import main

if __name__ == "__main__":
    main()
