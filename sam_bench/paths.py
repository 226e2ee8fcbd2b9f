"""Where the config tree lives: the copy shipped inside the wheel, or the repository's conf/."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> str:
    """Absolute path of the Hydra config tree.

    An editable install or a source checkout uses the repository's top-level ``conf/``; a regular
    wheel carries the same tree as ``sam_bench/conf`` (hatchling force-include).
    """
    for candidate in (_PACKAGE_DIR.parent / "conf", _PACKAGE_DIR / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"sam-bench config tree not found next to {_PACKAGE_DIR} (looked for conf/train.yaml); "
        "reinstall the package with `pip install .`"
    )


def data_dir(ds) -> str:
    """``dataset.root`` with ``~`` expanded (the shell expands ``data_root=~/x`` but not ``dataset.root=~/x``
    or ``SAM_BENCH_DATA='~/x'``, and torchvision expands it for some datasets and not for others), and
    a relative path taken from the directory the command was started in: with ``hydra.job.chdir=true``
    the job runs inside its run directory, where the default ``data`` would be a fresh one per run."""
    root = os.path.expanduser(str(ds.root))
    if os.path.isabs(root):
        return root
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return os.path.join(HydraConfig.get().runtime.cwd, root)
    return root
