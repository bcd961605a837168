"""mmtrain: pretraining MiniMax-01-style hybrid lightning/softmax MoE models."""


def from_pretrained(path, **kwargs):
    """An mmtrain checkpoint, run directory or HF (transformers / remote-code) MiniMax directory
    -> the model in eval mode; ``model(input_ids [B, T])`` returns logits [B, T, V].
    See :func:`mmtrain.hf.pretrained.from_pretrained` (imported lazily: no torch at import)."""
    from mmtrain.hf.pretrained import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)
