"""Compiling a command into a `Plan` (`build.py`), and planning an adapter's reduction
(`reduction.py`): decisions from headers and configs only, no tensor I/O."""

from bonemerge.plan.build import BlockOp, Plan, Step, build_plan

__all__ = ["BlockOp", "Plan", "Step", "build_plan"]
