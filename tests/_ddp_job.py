"""Two-rank DDP job for tests/test_ddp.py (gloo, 127.0.0.1 only): prints the rank-0 gradients as JSON.

    python tests/_ddp_job.py MODE PORT     # MODE: model (DDP around a model calling odeint) | field (DDP
                                           # around the vector field: its reducer syncs the gradients
                                           # that the adjoint's Function hands to the parameters)
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests._ddp_model import ODEBlock, data  # noqa: E402


def rank_main(rank, world, mode, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import rampde_plugins  # noqa: F401

        torch.manual_seed(0)
        block = ODEBlock()
        x, target = data()
        shard = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        if mode == "model":
            model = nn.parallel.DistributedDataParallel(block)
            loss = (model(x[shard]) - target[shard]).square().mean()
        else:
            block.field = nn.parallel.DistributedDataParallel(block.field)
            loss = (block(x[shard]) - target[shard]).square().mean()
        loss.backward()
        if rank == 0:
            queue.put({n.replace("module.", ""): p.grad.tolist() for n, p in block.named_parameters()})
        # Both ranks done before either tears gloo down: a rank destroying its process group while the
        # other still has a collective in flight aborted ("terminate called without an active
        # exception", SIGABRT) in 2 of 3 runs on a loaded 2-core machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank that got here has done its work (rank 0's gradients are in the pipe: SimpleQueue writes
    # synchronously). Leave without the interpreter's teardown: gloo's C++ threads destroyed there
    # aborted a rank now and then ("terminate called without an active exception", SIGABRT) after
    # everything had succeeded -- once in three fresh-clone CI runs on a loaded 2-core machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    mode, port = sys.argv[1], int(sys.argv[2])
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(rank_main, args=(2, mode, port, queue), nprocs=2, start_method="spawn")
    print(json.dumps(queue.get()))
