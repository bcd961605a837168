"""Hydra recipes → validated :class:`~mmtrain.config.Config`.

The recipes ship as package data (``mmtrain.recipes``, the top-level ``recipes/`` folder). We use
Hydra's compose API (no working-directory change, no Hydra logging) so the same overrides work
from the CLI, ``python -m mmtrain.train``, torchrun and tests.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from mmtrain.config import Config, ConfigError, config_from_dict

GROUPS = ("model", "data", "train", "parallel", "stage")


def recipes_dir() -> Path:
    import mmtrain.recipes

    return Path(mmtrain.recipes.__file__).parent


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml"))


def _check_override(ov: str) -> None:
    """Reject an override whose key is not a config field, in one line naming it."""
    if "=" not in ov:
        raise ConfigError(f"{ov}: an override must look like key=value (e.g. train.max_steps=10)")
    key, value = ov.split("=", 1)
    key = key.lstrip("+~")
    if "@" in key:
        return
    parts = key.split(".")
    if len(parts) == 1:
        if key in GROUPS:
            if value not in _options(key):
                raise ConfigError(f"{key}: no recipe '{value}'; available: "
                                  f"{', '.join(_options(key))} (files in recipes/{key}/)")
            return
        if key == "run":
            return
        raise ConfigError(f"{key}: unknown key; valid top-level keys are "
                          f"{sorted(GROUPS + ('run',))}")
    cls: typing.Any = Config
    path = []
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{'.'.join(path)}: is a value, not a section; "
                              f"drop '.{part}' from the override")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        path.append(part)
        if part not in fields:
            raise ConfigError(f"{'.'.join(path)}: unknown key; valid keys of "
                              f"'{'.'.join(path[:-1])}' are {sorted(fields)}")
        hint = typing.get_type_hints(cls)[part]
        cls = hint if dataclasses.is_dataclass(hint) else None


def compose(overrides: list[str] | None = None) -> dict:
    """The resolved recipe as a plain dict (no validation)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides = list(overrides or [])
    for ov in overrides:
        _check_override(ov)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except Exception as exc:  # Hydra's errors are multi-line; keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"recipe: {first}") from None
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=True)


def load_config(overrides: list[str] | None = None) -> Config:
    """Compose the recipe with ``overrides`` and validate it into typed dataclasses."""
    return config_from_dict(compose(overrides))
