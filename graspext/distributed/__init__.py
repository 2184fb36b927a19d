"""Data-parallel pruning, sparse training and RigL on torch.distributed (DDP; gloo on the CPU, NCCL on CUDA).

Launch with ``torchrun --nproc-per-node N ...`` or ``graspext train|run|sweep --nproc N``. Inside the process
group the library needs nothing more: :func:`graspext.prune` scores data-parallel, :class:`graspext.Trainer`
shards the loaders (their batch size is the global batch), trains through DistributedDataParallel and writes
files from rank 0 only, and RigL/SET reduce their grow scores before selecting. Masks are checked identical on
every rank at the start of training, after pruning and after every mask update.
"""

from graspext.distributed.comm import CommunicationMeter, TopKCompression, top_k_indices
from graspext.distributed.launch import launch
from graspext.distributed.runtime import Distributed, RankMismatchError, init_from_env
from graspext.distributed.sampler import ShardedSampler, shard_loader

__all__ = ["CommunicationMeter", "Distributed", "RankMismatchError", "ShardedSampler", "TopKCompression",
           "init_from_env", "launch", "shard_loader", "top_k_indices"]
