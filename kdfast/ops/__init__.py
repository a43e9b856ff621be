"""Differentiable ops and their device dispatch (autograd.Function lives here)."""
