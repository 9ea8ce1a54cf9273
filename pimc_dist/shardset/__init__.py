"""The shard format in one place: codecs, tar, manifest, writer, reader, batching, loader."""

from pimc_dist.shardset.format import *  # noqa: F401,F403  (interim: split in progress)
from pimc_dist.shardset.loader import *  # noqa: F401,F403
