"""Length mixtures and the QA component: which (component, length bucket) each row comes from.

Legend: progress p in [0, 1] = tokens before the row / the stage's tokens; B = 3 buckets.

* Buckets (SPEC §7): a document of n tokens is *short* when n < ``length_bounds[0]``, *long* when
  n > ``length_bounds[1]``, else *medium*. ``data.mixture = [short, medium, long]`` are the shares
  of rows drawn from each bucket (normalised); ``null`` = no bucketing (one bucket, documents in
  their natural proportion).
* Transition: with ``mixture_from`` (the previous stage's weights) and ``transition = w > 0`` the
  weights are ``lerp(mixture_from, mixture, min(p / w, 1))``: linear across the first fraction w
  of the stage, then the stage's own.
* QA: in the last ``qa_window`` of the stage (p >= 1 - qa_window) a share ``qa_fraction`` of the
  rows comes from ``data.qa_blend``, a blend of its own (no length buckets); the other rows
  follow the mixture, scaled by 1 - qa_fraction.

:func:`row_weights` gives, for progress p, the probability of the QA component and of each
bucket; :mod:`mmtrain.data.blend` draws from them.
"""

from __future__ import annotations

from mmtrain.config import ConfigError

BUCKETS = ("short", "medium", "long")


def parse_blend(value, path: str) -> list[tuple[float, str]]:
    """Megatron's flat ``[w0, prefix0, w1, prefix1, ...]`` (or ``[prefix]``) -> [(w, prefix)],
    weights normalised to sum to 1."""
    fix = (f"write it as [0.3,/data/a_text_document,0.7,/data/b_text_document] "
           f"(weight/prefix pairs) or [/data/a_text_document]")
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{path}: expected a non-empty list; {fix}")
    if len(value) == 1 and isinstance(value[0], str):
        return [(1.0, value[0])]
    if len(value) % 2:
        raise ConfigError(f"{path}: {len(value)} entries is not a list of weight/prefix pairs; {fix}")
    out = []
    for i in range(0, len(value), 2):
        w, p = value[i], value[i + 1]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ConfigError(f"{path}: entry {i} ({w!r}) is not a weight >= 0; {fix}")
        if not isinstance(p, str) or not p:
            raise ConfigError(f"{path}: entry {i + 1} ({p!r}) is not a path prefix; {fix}")
        out.append((float(w), p))
    total = sum(w for w, _ in out)
    if not total > 0:
        raise ConfigError(f"{path}: the weights sum to 0; give at least one positive weight")
    return [(w / total, p) for w, p in out]


def _check_weights(value, path: str) -> None:
    if value is None:
        return
    if (not isinstance(value, (list, tuple)) or len(value) != 3 or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0 for x in value)
            or not sum(value) > 0):
        raise ConfigError(f"{path}: expected three weights >= 0 [short, medium, long] with a "
                          f"positive sum (e.g. [0.3, 0.7, 0.0]), got {value!r}")


def validate_data_config(cfg, path: str = "data") -> None:
    if cfg.blend is not None and cfg.blend != []:
        parse_blend(cfg.blend, f"{path}.blend")
    if cfg.qa_blend is not None and cfg.qa_blend != []:
        parse_blend(cfg.qa_blend, f"{path}.qa_blend")
    b = cfg.length_bounds
    if (not isinstance(b, (list, tuple)) or len(b) != 2 or any(
            isinstance(x, bool) or not isinstance(x, int) for x in b) or not 0 < b[0] <= b[1]):
        raise ConfigError(f"{path}.length_bounds: expected two token counts 0 < short_max <= "
                          f"long_min, e.g. [32768, 131072], got {b!r}")
    _check_weights(cfg.mixture, f"{path}.mixture")
    _check_weights(cfg.mixture_from, f"{path}.mixture_from")
    if cfg.mixture_from is not None and cfg.mixture is None:
        raise ConfigError(f"{path}.mixture_from: set without data.mixture; give data.mixture (the "
                          f"stage's weights) or drop mixture_from")
    for name in ("transition", "qa_window"):
        v = getattr(cfg, name)
        if not 0 <= v <= 1:
            raise ConfigError(f"{path}.{name}: must be a fraction of the stage in [0, 1], got {v}")
    if not 0 <= cfg.qa_fraction < 1:
        raise ConfigError(f"{path}.qa_fraction: must be in [0, 1), got {cfg.qa_fraction}")


def uses_sampler(cfg) -> bool:
    """Whether the data goes through the blend/mixture sampler (else: data.corpus packed as one
    stream, the original path)."""
    return bool(cfg.blend) or cfg.mixture is not None or cfg.qa_fraction > 0


def bucket_of(length, bounds):
    """0 short, 1 medium, 2 long (numpy-vectorised over ``length``)."""
    import numpy as np

    length = np.asarray(length)
    return np.where(length < bounds[0], 0, np.where(length > bounds[1], 2, 1))


def mixture_at(cfg, progress: float):
    """[short, medium, long] bucket weights (normalised) at ``progress``, or None (no buckets)."""
    if cfg.mixture is None:
        return None
    target = [float(x) for x in cfg.mixture]
    if cfg.mixture_from is not None and cfg.transition > 0 and progress < cfg.transition:
        a = progress / cfg.transition
        target = [(1 - a) * float(f) + a * t for f, t in zip(cfg.mixture_from, target)]
    s = sum(target)
    return [x / s for x in target]


def qa_at(cfg, progress: float) -> float:
    """The QA component's share of rows at ``progress``."""
    if cfg.qa_fraction > 0 and progress >= 1.0 - cfg.qa_window:
        return float(cfg.qa_fraction)
    return 0.0


def row_weights(cfg, progress: float) -> tuple[float, list | None]:
    """(qa share, bucket weights of the rest or None)."""
    return qa_at(cfg, progress), mixture_at(cfg, progress)
