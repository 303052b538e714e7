"""Architecture search: every method of the papers on the package's supernets, with TopoNAS as a
plug-in (``--topo``) and Zero-One-Shot masks (``--mask``).

    from toponas_kernels.search import SearchConfig, run
    result = run(SearchConfig(space="nb201", method="darts", topo="topo", dataset="fashion-mnist",
                              epochs=5, out="runs/nb201"))
    print(result["genotype"])

or drive a method yourself, on your own supernet (``base.SearchMethod``)::

    from toponas_kernels.search import Darts
    method = Darts(model, epochs=50)
    method.begin_epoch(0); method.step((x, y), (x_val, y_val)); method.end_epoch(0)

One module per method: ``darts``, ``darts2``, ``pc_darts``, ``beta_darts``, ``gdas``, ``rome``;
``masks`` holds the Zero-One-Shot masks, ``runner`` the loop and its files.
"""

from .base import SearchMethod, accumulate_grads
from .beta_darts import BetaDarts, beta_decay
from .config import METHODS, SPACES, TOPO_MODES, ConfigError, SearchConfig, reference_defaults
from .darts import Darts
from .darts2 import Darts2
from .gdas import GDAS
from .masks import MaskError, load_masks, prune, random_masks, zero_shot_masks
from .methods import METHOD_CLASSES
from .pc_darts import PCDarts
from .rome import ROME
from .runner import build_supernet, run

__all__ = [
    "SearchConfig", "ConfigError", "MaskError", "METHODS", "SPACES", "TOPO_MODES", "METHOD_CLASSES",
    "SearchMethod", "Darts", "Darts2", "PCDarts", "BetaDarts", "GDAS", "ROME",
    "accumulate_grads", "beta_decay", "reference_defaults", "random_masks", "zero_shot_masks", "prune",
    "load_masks", "build_supernet", "run",
]
