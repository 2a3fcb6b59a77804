"""
How the model is spread over processes: one small interface, two implementations.

    Replicated  one process, or DDP under torchrun: every rank holds the whole model in float32,
                gradients are all-reduced in the backward of the last micro-step.
    Sharded     FSDP2 (torch.distributed.fsdp.fully_shard, `train.py --fsdp`): every rank holds
                1/N of each parameter, gradient and AdamW moment, for models that do not fit
                on one GPU with AdamW.

The training loop talks only to this interface:

    load(path)            the model to train, loaded from a Hugging Face folder and wrapped
    load_frozen(path)     a model for scoring only (DPO's reference), laid out the same way
    autocast              the context a forward runs in
    even(items, filler)   [(item, real)]: under FSDP every rank must run equally many forwards
    sync(last)            the context of one micro-step's backward: reduce gradients or not
    clip_grad_norm(max)   the global gradient norm (before clipping), as a float tensor
    save(folder, ...)     the Hugging Face model and the optimizer state into folder
    load_state(...)       the optimizer (and under FSDP the model) state back from a folder

Llama-3-8B under DDP: every GPU holds float32 weights (4 bytes per parameter), gradients (4) and
AdamW's two moments (8), 16 bytes x 8e9 = 128 GB, more than an 80 GB GPU has. Under FSDP each of
N ranks holds 1/N of all of it (a dim-0 shard, as a DTensor): 16 GB per GPU on 8 GPUs. A block's
full weights exist only while it computes: all-gathered (in bf16 under mixed precision) in its
forward and again in its backward, and freed after each. Gradients are reduce-scattered in every
micro-step's backward by default (grad_sync="every"), so between micro-steps a rank holds only
its float32 gradient shard (4 GB, not 32 GB, for 8B on 8 GPUs); grad_sync="last" reduces only in
the last micro-step, one reduce-scatter per optimizer step instead of one per micro-step, holding
full float32 gradients until then.

launch lines are in train.py's docstring.
"""

import math
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from hf_format import atomic_dir, read_pretrained, tensor_slices
from model import Llama, LlamaConfig
from packing import chunked_target_logprobs


def setup_distributed(device_arg=None):
    """(rank, world_size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them
    this is one process on device_arg (default: cuda when available)."""
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_arg or ("cuda" if use_cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:  # one GPU per process
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce_sum(values, device):
    """Sum a list of floats over ranks (in float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather(obj):
    """[every rank's obj] in rank order ([obj] in one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def shared_atomic_dir(path):
    """model.atomic_dir for a folder that every rank writes into: rank 0 creates the temporary
    folder (one name, on a file system all ranks share) and renames it once every rank is done."""
    master = rank_and_world()[0] == 0
    with atomic_dir(path) if master else nullcontext(str(path) + ".tmp") as tmp:
        barrier()  # the folder exists before any rank writes into it
        yield Path(tmp)
        barrier()  # every rank has written its part


class Replicated:
    """One process, or DDP: a full float32 copy of the model on every rank; the matmuls run in
    the compute dtype under autocast."""

    def __init__(self, device, dtype=torch.float32):
        self.rank, self.world = rank_and_world()
        self.device, self.dtype = device, dtype
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        self.model = self.module = None

    def load(self, path, gradient_checkpointing=False):
        """self.model: what forward is called on (DDP-wrapped across ranks); self.module: the Llama."""
        self.module = Llama.from_pretrained(path, dtype=torch.float32, device=self.device)
        self.module.gradient_checkpointing = gradient_checkpointing
        ddp = self.world > 1
        self.model = (
            DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if ddp
            else self.module
        )
        return self.model

    def load_frozen(self, path):
        return Llama.from_pretrained(path, dtype=torch.float32, device=self.device).eval()

    def even(self, items, filler=None):
        return [(item, True) for item in items]

    def sync(self, last):
        # DDP all-reduces gradients in backward; only the last micro-step of an optimizer step needs to
        return self.model.no_sync() if self.world > 1 and not last else nullcontext()

    def clip_grad_norm(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm if max_norm > 0 else float("inf"))

    def save(self, folder, optimizer=None, source_dir=None, dtype=None):
        """Rank 0 writes the Hugging Face model (and optimizer.pt) into the existing folder."""
        if self.rank == 0:
            self.module.save_pretrained(folder, source_dir=source_dir, dtype=dtype, atomic=False)
            if optimizer is not None:
                torch.save(optimizer.state_dict(), Path(folder) / "optimizer.pt")

    def load_state(self, optimizer, folder):
        optimizer.load_state_dict(
            torch.load(Path(folder) / "optimizer.pt", map_location=self.device, weights_only=True)
        )


class Sharded(Replicated):
    """FSDP2: each block, the final norm, the embedding and lm_head, each sharded over all ranks
    (empty_model says why).
    Parameters, gradients and AdamW state stay float32; with a bf16 compute dtype the blocks
    compute in bf16 and the parameters travel in bf16, while gradients are reduced in float32
    (reduce-scattering in bf16 would round the sum of N ranks). The mixed-precision policy casts
    the weights as it gathers them, so no autocast is needed. grad_sync: when gradients are
    reduce-scattered under gradient accumulation, "every" micro-step or only the "last" (the
    module docstring weighs the two)."""

    GRAD_SYNCS = ("every", "last")

    def __init__(self, device, dtype=torch.float32, grad_sync="every"):
        if grad_sync not in self.GRAD_SYNCS:
            raise ValueError(f"grad_sync {grad_sync!r}: expected one of {', '.join(self.GRAD_SYNCS)}")
        super().__init__(device, dtype)
        self.grad_sync = grad_sync
        self.autocast = nullcontext()
        if not dist.is_initialized():  # one process without torchrun: a group of one runs the same code
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
            )
            self.rank, self.world = 0, 1
        self.mesh = init_device_mesh(device.type, (self.world,))

    def empty_model(self, config):
        """A Llama of config, sharded: this rank's shards allocated on self.device, uninitialised.

        FSDP units (each all-gathered only while it computes, then freed): every block; the final
        norm; the embedding; lm_head. With tied embeddings the embedding and lm_head are one weight
        and stay with the root, gathered from the forward to the end of the backward.
        packing.response_logps reads lm_head's weight outside lm_head's forward (the chunked loss),
        so lm_head gets a forward method, target_logprobs, that FSDP gathers the weight around and
        again around its backward, whose end reduce-scatters its gradient."""
        with torch.device("meta"):  # shapes only; fully_shard turns each parameter into a DTensor of shards
            model = Llama(config)
        policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        # the final norm too (its weights are small): its reduce-scatter, right after lm_head's, frees the float32
        # buffer of lm_head's (FSDP keeps the last one until the next), before the last block's backward
        fully_shard(model.model.norm, mesh=self.mesh, mp_policy=policy)
        if not config.tie_word_embeddings:
            fully_shard(model.model.embed_tokens, mesh=self.mesh, mp_policy=policy)
            head = fully_shard(model.lm_head, mesh=self.mesh, mp_policy=policy)
            head.target_logprobs = lambda hidden, targets, chunk_size: chunked_target_logprobs(
                hidden, head.weight, targets, chunk_size
            )
            register_fsdp_forward_method(head, "target_logprobs")
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        model.to_empty(device=self.device)  # allocates this rank's shards, uninitialised
        if config.tie_word_embeddings:  # to_empty gave lm_head a separate copy; share one parameter again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    @torch.no_grad()
    def _load_sharded(self, path):
        """A sharded Llama from a Hugging Face folder. Each rank reads only the rows of its own
        shards, so an 8B start needs 32 GB of reads in all, not 32 GB on every rank."""
        config, located = read_pretrained(path, LlamaConfig.from_values, Llama.tensor_shapes, report_ignored=True)
        model = self.empty_model(config)
        params = dict(model.named_parameters())  # DTensors, Shard(0) over the ranks
        for name, tensor in tensor_slices(located):
            local = params[
                name
            ].to_local()  # this rank's rows: torch.chunk's split of dim 0 (the last ranks may get fewer or none)
            start = self.rank * math.ceil(params[name].shape[0] / self.world)
            if local.shape[0] > 0:
                local.copy_(tensor[start : start + local.shape[0]])  # reads only these rows, casts to float32
        model.source_dir = str(Path(path))
        return model

    def load(self, path, gradient_checkpointing=False):
        self.model = self.module = self._load_sharded(path)
        self.module.gradient_checkpointing = gradient_checkpointing
        return self.model

    def load_frozen(self, path):  # sharded like the policy: a full copy on every rank is what FSDP avoids
        return self._load_sharded(path).eval()

    def even(self, items, filler=None):
        """items extended by repeats of filler (default: the last item) to as many as the rank with
        the most has. A forward all-gathers each block's parameters, a collective call: a rank that
        ran one micro-batch fewer than the others would leave them waiting forever. The repeats are
        marked not real; the caller weighs them zero."""
        n = torch.tensor([len(items)], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        filler = items[-1] if filler is None else filler
        return [(item, True) for item in items] + [(filler, False)] * (int(n) - len(items))

    def sync(self, last):
        # "every": each micro-step's backward reduce-scatters its gradients and adds them to this
        # rank's float32 shard (p.grad), so no full-size gradient outlives a block's backward.
        # "last": earlier micro-steps add into full unsharded float32 gradients, reduced once at the end.
        self.model.set_requires_gradient_sync(last or self.grad_sync == "every")
        return nullcontext()

    def clip_grad_norm(self, max_norm):
        norm = super().clip_grad_norm(max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm  # the norm over every rank's shards

    def save(self, folder, optimizer=None, source_dir=None, dtype=None):
        """Every rank takes part in gathering each tensor in turn onto rank 0's CPU (the only full
        copy anywhere), which writes the Hugging Face folder; then each rank writes its own shards
        of model and AdamW state to folder/sharded/ with torch.distributed.checkpoint (all ranks
        must see the same file system, e.g. a shared disk across nodes)."""
        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )  # {} on ranks > 0
        if self.rank == 0:
            self.module.save_pretrained(folder, state_dict=full, source_dir=source_dir, dtype=dtype, atomic=False)
        del full
        barrier()
        if optimizer is not None:
            model_state, optimizer_state = get_state_dict(self.model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=Path(folder) / "sharded")
        barrier()

    def load_state(self, optimizer, folder):
        """Inverse of save, for any number of ranks: DCP reads the slices each shard needs, so a
        run can resume on a different number of ranks."""
        model_state, optimizer_state = get_state_dict(self.model, optimizer)  # the layout to read into
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=Path(folder) / "sharded")
        set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
