"""Interchange with transformers' MiniMax (and the released remote-code layout).

    export_hf(checkpoint, out_dir)      mmtrain checkpoint -> transformers directory
    import_hf(hf_dir, out_checkpoint)   transformers / remote-code directory -> mmtrain checkpoint
    from_pretrained(path)               either kind -> model in eval mode, model(ids) -> logits
    load_weights(path, model)           what ``train.init_from`` calls

See docs/hf_interop.md for the mapping and its caveats.
"""

from mmtrain.hf.tensor_io import InteropError


def export_hf(*args, **kwargs):
    from mmtrain.hf.export import export_hf as f

    return f(*args, **kwargs)


def import_hf(*args, **kwargs):
    from mmtrain.hf.import_ import import_hf as f

    return f(*args, **kwargs)


def from_pretrained(*args, **kwargs):
    from mmtrain.hf.pretrained import from_pretrained as f

    return f(*args, **kwargs)


def load_weights(*args, **kwargs):
    from mmtrain.hf.pretrained import load_weights as f

    return f(*args, **kwargs)


__all__ = ["InteropError", "export_hf", "from_pretrained", "import_hf", "load_weights"]
