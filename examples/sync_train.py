"""Data-parallel training with synchronized batch norm on CPUs: run it with torchrun.

    torchrun --nproc_per_node 2 examples/sync_train.py

Each process trains on its own share of every batch; the batch norms' statistics span all the
shares (symbn.torch.convert_sync_batchnorm), DistributedDataParallel averages the gradients.
"""
import torch
import torch.distributed as dist

import symbn.torch

dist.init_process_group("gloo")                     # torchrun sets the rank, world size and address
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)                                 # the same initial model on every process
model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
model = torch.nn.parallel.DistributedDataParallel(symbn.torch.convert_sync_batchnorm(model))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = torch.Generator().manual_seed(1)
steps = 10
for _ in range(steps):
    x, target = torch.randn(8 * world, 3, 16, 16, generator=data), torch.randint(0, 10, (8 * world,), generator=data)
    mine = slice(8 * rank, 8 * (rank + 1))          # this process's share of the batch
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x[mine]), target[mine])
    loss.backward()
    optimizer.step()
if rank == 0:
    print(f"{world} processes, step {steps}: loss {loss.item():.4f}")
dist.barrier()                                       # leave together: none tears down while another still talks
dist.destroy_process_group()
