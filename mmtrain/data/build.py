"""The loader a training run uses, chosen from the recipe (one call from the training loop).

* ``data.blend``, ``data.mixture``, ``data.qa_fraction > 0`` or ``train.batch_schedule``: the
  blend sampler (:class:`mmtrain.data.blend.BlendLoader`) over memory-mapped ``.bin/.idx``
  prefixes (``data.corpus`` preprocessed into the cache when there is no ``data.blend``).
* otherwise: ``data.corpus`` preprocessed once into the cache, memory-mapped, cut into rows of one
  packed stream and shuffled by row (:class:`mmtrain.data.loader.DataLoader`), as before.
"""

from __future__ import annotations

from mmtrain.config import Config
from mmtrain.data.mixture import uses_sampler


def uses_blend_loader(cfg: Config) -> bool:
    return uses_sampler(cfg.data) or bool(cfg.train.batch_schedule)


def build_loader(cfg: Config, tokenizer, dp_rank: int, dp: int, announce: bool = False):
    from mmtrain.data.preprocess import cached_corpus

    if uses_blend_loader(cfg):
        from mmtrain.data.blend import BlendLoader
        from mmtrain.train.schedules import BatchSchedule

        prefix = None if cfg.data.blend else cached_corpus(cfg.data, tokenizer, announce)
        return BlendLoader(cfg.data, BatchSchedule.from_config(cfg.train, cfg.data.seq_len),
                           cfg.train.max_steps, cfg.train.micro_batch, dp_rank, dp,
                           vocab_size=cfg.model.vocab_size, corpus_prefix=prefix)
    from mmtrain.data.loader import DataLoader
    from mmtrain.data.packing import build_dataset

    dataset = build_dataset(cfg.data, tokenizer, announce=announce)
    if len(dataset) < cfg.train.global_batch:  # name the corpus: the loader cannot
        from mmtrain.config import ConfigError

        raise ConfigError(f"data.corpus: {cfg.data.corpus} gives {len(dataset)} rows of "
                          f"data.seq_len={cfg.data.seq_len} tokens, fewer than one global batch "
                          f"(train.global_batch={cfg.train.global_batch}); use more text, a "
                          f"smaller data.seq_len or a smaller train.global_batch")
    return DataLoader(dataset, cfg.train.global_batch, cfg.train.micro_batch, dp_rank, dp,
                      cfg.data.seed)
