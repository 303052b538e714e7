"""The search methods by their command-line names."""

from .beta_darts import BetaDarts
from .darts import Darts
from .darts2 import Darts2
from .gdas import GDAS
from .pc_darts import PCDarts
from .rome import ROME

METHOD_CLASSES = {
    "darts": Darts,
    "darts2": Darts2,
    "pc-darts": PCDarts,
    "beta-darts": BetaDarts,
    "gdas": GDAS,
    "rome": ROME,
}
