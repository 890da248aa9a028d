"""Entry point: ``python interop.py import best_converter_ckpt.pth --classifier resnet50 --weights W --store DIR
--out model.ckpt``."""

from cefam_lightning.cli.interop import main

if __name__ == "__main__":
    main()
