"""A seeded simulator of an Ozon cross-border seller's shop, with ground truth.

``simulate_shop`` runs the world; ``write_history`` writes it in the data contract's format
(and, with ``truth=True``, the true cancellation probabilities of the postings open at the
export moment, their outcomes after it, and each cause's contribution to those probabilities:
:mod:`simulator.causes`).
"""

from simulator.export import write_history
from simulator.parameters import Dynamics, SimulationConfig
from simulator.shop import SimulatedWorld, simulate_shop

__all__ = ["Dynamics", "SimulatedWorld", "SimulationConfig", "simulate_shop", "write_history"]
