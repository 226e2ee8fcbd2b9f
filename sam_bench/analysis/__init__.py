"""Analyses of trained models (the paper's Fig. 3 left: the Hessian spectrum)."""
