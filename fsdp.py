"""
Fully sharded data parallel training for `train.py --fsdp`, with PyTorch's FSDP2
(torch.distributed.fsdp.fully_shard): what a model needs when one GPU cannot hold it with AdamW.

Llama-3-8B under DDP: every GPU holds float32 weights (4 bytes per parameter), gradients (4) and
AdamW's two moments (8), 16 bytes x 8e9 = 128 GB, more than an 80 GB GPU has. Under FSDP each of
N ranks holds 1/N of every parameter, gradient and moment (a dim-0 shard, as a DTensor): 16 GB
per GPU on 8 GPUs. A block's full weights exist only while it computes: all-gathered (in bf16
under mixed precision) in its forward and again in its backward, and freed after each.

What changes against DDP, and where it lives:
  load_model         the model is built on the meta device and each rank reads only its own rows
                     of every tensor from the safetensors files: no rank ever holds the full model
  save_hf            the Hugging Face folder (checkpoint-STEP/, final/): tensors gathered one at a
                     time onto rank 0's CPU, the only full copy anywhere, then written by rank 0
  save_state /       model and AdamW state, sharded, with torch.distributed.checkpoint (DCP): every
  load_state         rank writes and reads its own shards; DCP reshards on load, so a run can
                     resume on a different number of ranks
  pad_to_max_count   every rank must run equally many forwards (each one all-gathers, collectively)

The loss needs nothing special: response_logps applies lm_head after the model's forward, and
FSDP keeps the root module's parameters (embeddings, final norm, lm_head) unsharded from its
forward until its backward is done, so lm_head.weight is the full weight there and its gradient
is reduce-scattered with the others when the backward ends.
"""

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model import Llama, LlamaConfig, checkpoint_tensors


def shard(model, device, param_dtype=torch.float32):
    """fully_shard each transformer block, then the whole model (embeddings, final norm, lm_head
    and anything left form the root's group). Parameters, gradients and AdamW state stay float32;
    with param_dtype bfloat16 the blocks compute in bf16 and the parameters travel in bf16, while
    gradients are reduced in float32 (reduce-scattering in bf16 would round the sum of N ranks)."""
    if not dist.is_initialized():  # one process without torchrun: a group of one runs the same code
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@torch.no_grad()
def load_model(path, device, param_dtype=torch.float32):
    """A sharded Llama from a Hugging Face checkpoint folder. Each rank reads only the rows of its
    own shards, so an 8B start needs 32 GB of reads in all, not 32 GB on every rank."""
    config = LlamaConfig.from_json(Path(path) / "config.json")
    with torch.device("meta"):  # shapes only; shard() turns each parameter into a DTensor of shards
        model = Llama(config)
    shard(model, device, param_dtype)
    model.to_empty(device=device)  # allocates this rank's shards, uninitialised
    if config.tie_word_embeddings:  # to_empty gave lm_head a separate copy; share one parameter again
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())  # DTensors, Shard(0) over the ranks
    for name, tensor in checkpoint_tensors(path, config):
        local = params[name].to_local()  # this rank's rows, torch.chunk's split of dim 0 (the last ranks may get fewer or none)
        start = params[name].device_mesh.get_local_rank() * math.ceil(params[name].shape[0] / dist.get_world_size())
        if local.shape[0] > 0:
            local.copy_(tensor[start : start + local.shape[0]])  # reads only these rows, casts to float32
    model.source_dir = str(path)
    return model


def save_hf(model, path, source_dir):
    """Write the Hugging Face folder of a sharded model. Every rank takes part in gathering each
    tensor in turn; rank 0 keeps them on its CPU (one full copy, float32) and writes the folder."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # {} on ranks > 0
    if dist.get_rank() == 0:
        model.save_pretrained(path, state_dict=full, source_dir=source_dir)
    del full
    dist.barrier()


def save_state(model, optimizer, path):
    """Model and AdamW state, each rank writing its own shards into the folder path (all ranks
    must see the same file system, e.g. a shared disk across nodes)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)


def load_state(model, optimizer, path):
    """Inverse of save_state, for any number of ranks: DCP reads the slices each shard needs."""
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout to read into
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def pad_to_max_count(items, filler, device):
    """items extended by repeats of filler to as many as the rank with the most has. A forward
    all-gathers each block's parameters, a collective call: a rank that ran one micro-batch fewer
    than the others would leave them waiting forever. The caller weights the repeats zero."""
    n = torch.tensor([len(items)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return items + [filler] * (int(n) - len(items))
