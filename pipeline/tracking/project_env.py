"""Register the installed virtualenv as the one `mlflow run` would build for python_env.yaml.

`mlflow run . -e adapt` (no --env-manager) looks for an environment named after python_env.yaml and
requirements.txt under MLflow's env root (MLFLOW_ENV_ROOT, default ~/.mlflow/envs) and builds one
with pyenv when none exists, which needs the internet. `make` links the project's .venv there under
that name, computed by MLflow's own function, so `mlflow run` reuses it, offline.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def register(venv: Path) -> Path:
    """Link `venv` where `mlflow run` looks for this project's environment; returns the link."""
    from mlflow.utils.environment import _PythonEnv
    from mlflow.utils.virtualenv import _get_mlflow_virtualenv_root, _get_virtualenv_name

    name = _get_virtualenv_name(_PythonEnv.from_yaml(str(ROOT / "python_env.yaml")), ROOT)
    link = Path(_get_mlflow_virtualenv_root()) / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():  # an environment MLflow built itself: leave it, it works too
        return link
    link.symlink_to(venv.resolve(), target_is_directory=True)
    return link


if __name__ == "__main__":
    print(f"mlflow run will use {sys.prefix} (linked at {register(Path(sys.prefix))})")
