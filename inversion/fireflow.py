"""FireFlow (Deng et al., ICML 2025, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic
Editing"): RF-Solver's midpoint step with the start velocity of each step taken from the previous
step's midpoint evaluation, so a step costs one network evaluation (one more for the first), with
second-order accuracy kept in practice. Its defaults: 8 steps each way, values shared in every
single-stream block (SD3: every joint block) during the first editing step. Inversion, editing and
value sharing are otherwise RF-Solver's (`inversion.rf_solver`).
"""

from dataclasses import dataclass

from diffedit.engines import register
from diffedit.inversion.rf_solver import RFSolver, RFSolverParams


@dataclass(frozen=True)
class FireFlowParams(RFSolverParams):
    share_steps: int = 1
    share_from: float = 0.0


@register
class FireFlow(RFSolver):
    name = "fireflow"
    Params = FireFlowParams
    default_steps = 8
    reuse_velocity = True
