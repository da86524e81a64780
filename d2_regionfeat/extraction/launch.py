"""
Starting the processes of a run: detectron2's ``launch`` on GPUs, and its CPU counterpart.

detectron2 0.6's ``launch`` always initializes NCCL and asserts that CUDA is available; newer
detectron2 versions fall back to the gloo backend without a GPU. :func:`launch` does what
those do on CPU (one process per ``num_processes``, gloo, the local process group of
:mod:`detectron2.utils.comm`) and leaves every GPU run to detectron2's own ``launch``.
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine import launch as detectron2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm


def launch(main_func, num_processes, num_machines=1, machine_rank=0, dist_url=None, args=(),
           device="cuda"):
    """
    Run ``main_func(*args)`` in ``num_processes`` processes on each of ``num_machines``
    machines (detectron2's ``--num-gpus``, ``--num-machines``, ``--machine-rank`` and
    ``--dist-url``); on ``device`` "cpu" they communicate through gloo.
    """
    world_size = num_machines * num_processes
    if world_size == 1 or not device.startswith("cpu"):
        detectron2_launch(main_func, num_processes, num_machines, machine_rank, dist_url, args=args)
        return
    if dist_url == "auto":
        assert num_machines == 1, "dist_url=auto not supported in multi-machine jobs."
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes,
        args=(main_func, world_size, num_processes, machine_rank, dist_url, args),
        daemon=False,
    )


def _cpu_worker(local_rank, main_func, world_size, num_processes, machine_rank, dist_url, args):
    global_rank = machine_rank * num_processes + local_rank
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank,
        timeout=DEFAULT_TIMEOUT,
    )
    for i in range(world_size // num_processes):
        group = dist.new_group(list(range(i * num_processes, (i + 1) * num_processes)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    # The machine's cores are shared by its processes.
    torch.set_num_threads(max(1, torch.get_num_threads() // num_processes))
    comm.synchronize()
    main_func(*args)
