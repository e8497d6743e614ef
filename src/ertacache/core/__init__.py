"""The pure-torch core: grids, reuse modes, rectification, the per-step engine and the Euler loop.

Nothing here imports model or pipeline code; integrations drive the same engine.
"""
