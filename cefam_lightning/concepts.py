"""Entry point: ``python -m cefam_lightning.concepts from-broden ROOT --out FILE`` (or ``from-imagenet-s``) writes a
concept file from a dataset's own label files; the command is :mod:`cefam_lightning.cli.concepts`."""

from cefam_lightning.cli.concepts import main

if __name__ == "__main__":
    main()
