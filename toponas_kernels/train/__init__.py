"""Retraining a searched cell from scratch (``toponas train``).

    from toponas_kernels.train import TrainConfig, train
    result = train(TrainConfig(genotype="runs/a/result.json", dataset="cifar10", epochs=600, out="runs/a-train"))
    print(result["params"], result["test_accuracy"])

``genotypes`` reads what ``--genotype`` accepts (and holds the published cells), ``darts_network``
and ``nb201_network`` are the evaluation networks, ``trainer`` the loop and its files.
"""

from .darts_network import DartsEvalNetwork, count_parameters, drop_path
from .genotypes import PUBLISHED, Arch, GenotypeError, load_arch, parse_genotype
from .nb201_network import NB201EvalNetwork
from .trainer import REFERENCE, TrainConfig, build_network, train

__all__ = [
    "TrainConfig", "train", "REFERENCE", "build_network", "Arch", "GenotypeError", "PUBLISHED", "load_arch",
    "parse_genotype", "DartsEvalNetwork", "NB201EvalNetwork", "count_parameters", "drop_path",
]
