"""Entry point: ``python precompute.py --images SRC --concepts FILE --model NAME --pretrained TAG --out STORE``."""

from cefam_lightning.cli.precompute import main

if __name__ == "__main__":
    main()
