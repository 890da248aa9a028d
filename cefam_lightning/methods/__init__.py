"""The explainers, one package per method behind one interface (:mod:`cefam_lightning.methods.base`), looked up
by name in the registry (:mod:`cefam_lightning.methods.registry`). Importing this package registers the built-in
methods: CE-FAM, L-CAM-Fm, L-CAM-Img and SIAM."""

from cefam_lightning.methods.cefam import method as _cefam  # noqa: F401 - registers "cefam"
from cefam_lightning.methods.lcam import method as _lcam  # noqa: F401 - registers "lcam_fm", "lcam_img"
from cefam_lightning.methods.siam import method as _siam  # noqa: F401 - registers "siam"
