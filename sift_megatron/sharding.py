"""Where a tensor-parallel shard sits in its logical tensor, and the layout-independent names that checkpoints,
masks, init and export use: the rules every layout shares, below sparse/ and models/ (megatron-core's
contiguous TP sharding; decoder layer indices become global layer numbers under PP / VP)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sift_megatron import comm


def global_param_names(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(layout-independent name, param): decoder layer indices become global layer numbers, and a tied
    output layer on the last stage takes the embedding's name (it holds the same logical weight)."""
    layer_offset = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for i, layer in enumerate(decoder.layers):
            layer_offset[i] = layer.layer_number - 1
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, p in model.named_parameters():
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
            parts[2] = str(layer_offset[int(parts[2])])
            name = ".".join(parts)
        if tied and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"
        yield name, p


def logical_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    from megatron.core import parallel_state as ps

    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= ps.get_tensor_model_parallel_world_size()
    return tuple(shape)


def placement(p: torch.nn.Parameter) -> tuple[tuple[int, ...], list[int]]:
    """(logical shape, offsets of this rank's shard in it) of a parameter under megatron's TP sharding."""
    from megatron.core import parallel_state as ps

    offsets = [0] * p.dim()
    if getattr(p, "tensor_model_parallel", False):
        offsets[p.partition_dim] = ps.get_tensor_model_parallel_rank() * p.shape[p.partition_dim]
    return logical_shape(p), offsets


def gather_tp(t: torch.Tensor, dim: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t.detach().clone()
    return torch.cat(comm.all_gather(t, group=ps.get_tensor_model_parallel_group()), dim=dim)
