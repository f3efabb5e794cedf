"""Ranking criteria behind one interface (see base.py). Importing a module registers it."""

from toolchain.ranking.base import CRITERIA, Criterion, LayerRanking, PrunableLayer, RankContext

__all__ = ["CRITERIA", "Criterion", "LayerRanking", "PrunableLayer", "RankContext", "load_criteria"]


def load_criteria() -> None:
    """Import every criterion module so the registry is complete (optional ones may be absent)."""
    import importlib

    for module in ("basic", "cmi", "mipp", "reconstruction"):
        try:
            importlib.import_module(f"toolchain.ranking.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"toolchain.ranking.{module}":
                raise
