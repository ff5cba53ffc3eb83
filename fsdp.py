"""
train.py --fsdp: the base and its adapters sharded over torchrun's processes with FSDP2 (torch.distributed.fsdp's
fully_shard), for a base that does not fit whole on one GPU. Each process keeps 1/world_size of every weight (the
rows of each tensor, in even chunks) and gathers one transformer block's whole weights at a time, in the forward
and again in the backward; gradients are reduced and scattered so that each process keeps its shard's.

    shard_model          fully_shard each block, the embeddings and the output layer, then the root
    new_sharded_model    a new run's model: built on the meta device, then each process fills only its shard, tensor
                         by tensor from the checkpoint: no process ever holds the whole base
    whole, to_shards     whole tensors from this process's shards (every process takes part) and back: ckpt.pt and
                         adapter.safetensors hold whole tensors, exactly as a one-process run writes them
    first_rows           the first rows of a weight, whole or sharded (the base's fingerprint)
    in_lockstep          grading: a sharded forward is a collective, so every process calls it as often as the others

What stays as under DDP: each process trains on its share of each batch, and forms the auxiliary losses (contrastive,
balance, router z) from its own tokens; the gradient is the mean over processes. A quantised base is not sharded
(train.py refuses --fsdp with --quantize: see check_args).
"""
import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from checkpoints import load_weights, open_checkpoint
from model import Transformer
from moelora import inject_moelora, load_moelora_state_dict, mark_only_moelora_as_trainable, moelora_state_dict
from tokenizer import Tokenizer


def shard_model(model: Transformer, amp_dtype: torch.dtype):
    """FSDP2 on each block (the unit gathered whole at a time), on the embeddings and on the output layer, then on
    the root for the rest (the last norm). Under autocast the weights are gathered in its dtype (half the traffic;
    the fp32 adapters are cast as autocast would) and the gradients reduced in float32."""
    policy = MixedPrecisionPolicy(param_dtype=None if amp_dtype == torch.float32 else amp_dtype,
                                  reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    if not model.args.tie_word_embeddings:  # (tied, they share one weight: it stays in the root's unit)
        fully_shard(model.tok_embeddings, mp_policy=policy)  # gathered only while used: 0.26 GB each at 7B
        fully_shard(model.output, mp_policy=policy)
    # FSDP2 keeps the root's weights gathered after its forward by default (the backward would gather them again
    # at once); in grading there is no backward, and they would stay gathered throughout
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    return model


def new_sharded_model(path, precision, adapter, seed: int):
    """(model, tokenizer) of a new --fsdp run: the base of the checkpoint at path with fresh adapters (adapter: their
    config), sharded over the processes, only the adapters trainable. The adapters are those a one-process run draws
    with the same seed (fresh_adapters). precision: runs.Precision (device, compute dtype)."""
    args, tensors = open_checkpoint(Path(path))
    tok = Tokenizer.from_dir(path)
    with torch.device("meta"):  # no memory: the shapes only
        model = Transformer(args).to(precision.weights_dtype())
    fresh = fresh_adapters(model.args, adapter, seed)
    inject_moelora(model, adapter)
    mark_only_moelora_as_trainable(model)
    shard_model(model, precision.amp_dtype)
    model.to_empty(device=precision.device)  # each process allocates its shards only (a tied output stays tied)
    base = {k: p for k, p in model.state_dict(keep_vars=True).items() if not p.requires_grad}
    if args.tie_word_embeddings:
        base.pop("output.weight")  # the same parameter as tok_embeddings.weight: loaded once
    load_weights(base, tensors, path, copy=copy_shard)
    load_moelora_state_dict(model, to_shards(model, fresh))
    return model.eval(), tok


def fresh_adapters(args, adapter, seed: int) -> dict:
    """The whole adapters (moelora_state_dict) that runs.new_model draws on the CPU after seeding torch with seed:
    injected into a stand-in of the base whose linear weights take no memory (a zero broadcast to their shape).
    Every process draws the same ones, and keeps its shard."""
    with torch.device("meta"):
        stand_in = Transformer(args)
    for module in stand_in.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(torch.zeros(()).expand(module.weight.shape), requires_grad=False)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream (dropout...) goes on as it was
        torch.manual_seed(seed)
        return moelora_state_dict(inject_moelora(stand_in, adapter))


def local_rows(param: DTensor, whole: torch.Tensor) -> torch.Tensor:
    """This process's rows of whole, for the sharded parameter param: FSDP2 splits dim 0 as torch.chunk does (even
    chunks of ceil(rows / world_size), the last ones shorter or empty)."""
    local = param.to_local()
    per_rank = -(-whole.shape[0] // param.device_mesh.size())
    start = param.device_mesh.get_local_rank() * per_rank
    part = whole[start:start + local.shape[0]]
    assert part.shape == local.shape, f"shard {tuple(part.shape)} != {tuple(local.shape)}: FSDP2 shards otherwise"
    return part


def copy_shard(param, whole: torch.Tensor):
    """checkpoints.load_weights' copy: only this process's rows of whole go into it (to the device from the CPU)."""
    param.to_local().copy_(local_rows(param, whole))


def to_shards(model, state: dict) -> dict:
    """Whole tensors named as model's parameters (a state dict) -> the same, each sharded as its parameter is
    (DTensors to copy into it); other entries as they are."""
    params = dict(model.named_parameters())
    return {k: shard_like(params[k], v) if isinstance(params.get(k), DTensor) else v for k, v in state.items()}


def shard_like(param: DTensor, whole: torch.Tensor) -> DTensor:
    local = local_rows(param, whole).to(param.device)
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def whole(state: dict) -> dict:
    """A state dict with its sharded tensors gathered whole, on the CPU. Every process must call it, in the same
    order: each gather is a collective."""
    return {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in state.items()}


def whole_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with its moments gathered whole: what a one-process run saves (every process calls it)."""
    sd = optimizer.state_dict()
    return {**sd, "state": {i: whole(s) for i, s in sd["state"].items()}}


def optimizer_state_to_shards(optimizer, sd: dict) -> dict:
    """A whole optimizer state (whole_optimizer_state's, or a one-process run's) with each moment sharded as its
    parameter is, for optimizer.load_state_dict."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def sharded(i: int, value):  # exp_avg and exp_avg_sq have the parameter's shape; step is a 0-dim tensor
        return shard_like(params[i], value) if isinstance(params[i], DTensor) and value.dim() else value
    return {**sd, "state": {i: {k: sharded(i, v) for k, v in s.items()} for i, s in sd["state"].items()}}


def first_rows(weight, n: int) -> torch.Tensor:
    """weight[:n], whole: of a sharded weight, rank 0 holds the first rows (n at most its share), and sends them."""
    if not isinstance(weight, DTensor):
        return weight[:n]
    local = weight.to_local()
    assert n <= -(-weight.shape[0] // weight.device_mesh.size()), f"rank 0 holds fewer than {n} rows"
    rows = local[:n].contiguous() if dist.get_rank() == 0 else torch.empty(n, *local.shape[1:], dtype=local.dtype,
                                                                           device=local.device)
    dist.broadcast(rows, src=0)
    return rows


@contextlib.contextmanager
def in_lockstep(model, sharded: bool, device):
    """Grading under --fsdp: a sharded model's forward gathers each block's weights from every process, so all of
    them must call it the same number of times, whatever their share of the questions and the lengths of their
    answers. Inside, each forward first tells the others (one all_reduce) that this process still has work; at the
    end, a process with none left runs one-token forwards until none has any. Without sharding: nothing."""
    if not sharded:
        yield
        return

    def anyone_busy(busy: bool) -> bool:
        flag = torch.tensor([float(busy)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def busy_before_each_forward(module, inputs):
        anyone_busy(True)

    # before FSDP's own pre-forward hook (prepend), which gathers the root's weights: the all_reduce comes first
    hook = model.register_forward_pre_hook(busy_before_each_forward, prepend=True)
    try:
        yield
    finally:
        hook.remove()
    idle = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        while anyone_busy(False):
            model(idle)
