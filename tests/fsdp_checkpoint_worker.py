"""Worker of tests/test_training.py::test_fsdp_checkpoints_resume_across_shards, run by torchrun on 2 CPU processes
(gloo): FSDP2-sharded model + AdamW, 3 steps, save_training_state, then a fresh sharded copy loads it; both continue
2 steps and must stay identical. Prints one JSON line on rank 0."""

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

# the module alone (it has no package-relative imports): importing diffusers_var would double this test's time
_spec = importlib.util.spec_from_file_location(
    "checkpoint", Path(__file__).resolve().parents[1] / "src" / "diffusers_var" / "training" / "checkpoint.py"
)
checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checkpoint)
load_training_state, save_training_state = checkpoint.load_training_state, checkpoint.save_training_state


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    decay, no_decay = [model[0].weight, model[2].weight], [model[0].bias, model[2].bias]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, types.SimpleNamespace(optimizer=optimizer), scheduler


def train_step(model, optimizer, scheduler, seed, rank):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed * 10 + rank))
    model(x).pow(2).mean().backward()
    optimizer.optimizer.step()
    optimizer.optimizer.zero_grad()
    scheduler.step()


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType.FSDP,
        process_index=rank,
        is_main_process=rank == 0,
        num_processes=dist.get_world_size(),
        step=7,
        scaler=None,
        unwrap_model=lambda m: m,
    )
    model, optimizer, scheduler = build()
    for seed in range(3):
        train_step(model, optimizer, scheduler, seed, rank)
    folder = Path(sys.argv[1])
    save_training_state(folder, accelerator, model, optimizer, scheduler, None, 3, {"task": "test"})
    dist.barrier()
    resumed, resumed_optimizer, resumed_scheduler = build()
    accelerator.step = 0
    state = load_training_state(folder, accelerator, resumed, resumed_optimizer, resumed_scheduler, None)
    for seed in range(3, 5):
        train_step(model, optimizer, scheduler, seed, rank)
        train_step(resumed, resumed_optimizer, resumed_scheduler, seed, rank)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    a, b = get_model_state_dict(model, options=full), get_model_state_dict(resumed, options=full)
    oa = get_optimizer_state_dict(model, optimizer.optimizer, options=full)
    ob = get_optimizer_state_dict(resumed, resumed_optimizer.optimizer, options=full)
    if rank == 0:
        print(
            json.dumps(
                {
                    "files": sorted(p.name for p in folder.iterdir()),
                    "step": state["step"],
                    "accelerator_step": accelerator.step,
                    "model_diff": max((a[k] - b[k]).abs().max().item() for k in a),
                    "optimizer_diff": max(
                        (oa["state"][k][n] - ob["state"][k][n]).abs().max().item()
                        for k in oa["state"]
                        for n in oa["state"][k]
                    ),
                    "lr": [scheduler.get_last_lr(), resumed_scheduler.get_last_lr()],
                }
            )
        )
    dist.barrier()
    # gloo's teardown (destroy_process_group or the interpreter's exit) can abort with "terminate called without an
    # active exception" under load after all the work is done; leave without running C++ destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
