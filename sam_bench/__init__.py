"""sam-bench: reproduce Sharpness-Aware Minimization (Foret et al., ICLR 2021)."""

__version__ = "0.1.0"
