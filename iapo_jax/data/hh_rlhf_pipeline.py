"""Reading prepared HH-RLHF pairs: a TFDS data source fed through grain, sharded per process.

Each JAX process reads its own disjoint shard of the records, so a multi-host job sees every
pair once per epoch without coordination; each epoch is shuffled deterministically by a seed.
Records come back as Python strings:
{"prompt", "chosen", "rejected", "messages": [{"role", "content"}], "line"}.

grain worker processes (worker_count > 0) re-import the main module: scripts need an
``if __name__ == "__main__":`` guard. Tests use worker_count=0 (in-process).
"""

from __future__ import annotations

import grain

from iapo_jax.data.hh_rlhf import SPLITS, HhRlhf


def hh_rlhf_source(subset: str, split: str, data_dir, manual_dir=None, strict: bool = False):
    """The random-access source of one prepared subset/split, preparing it first if needed.

    data_dir: where TFDS keeps prepared datasets. manual_dir: the folder holding the official
    ``<subset>/{train,test}.jsonl.gz`` files (needed only the first time).
    """
    import tensorflow_datasets as tfds

    if split not in SPLITS:
        raise ValueError(f"HH-RLHF split must be one of {SPLITS}, got {split!r}")
    builder = HhRlhf(config=subset, data_dir=str(data_dir), strict=strict)
    if not builder.is_prepared():
        if manual_dir is None:
            raise FileNotFoundError(
                f"HH-RLHF {subset} is not prepared under {data_dir}; pass manual_dir= the folder "
                f"with {subset}/train.jsonl.gz and {subset}/test.jsonl.gz to prepare it"
            )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        )
    return builder.as_data_source(split=split)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class DecodePreference(grain.transforms.Map):
    """TFDS bytes -> Python strings, with messages as a list of {"role", "content"} dicts."""

    def map(self, record):
        messages = record["messages"]
        return {
            "prompt": _text(record["prompt"]),
            "chosen": _text(record["chosen"]),
            "rejected": _text(record["rejected"]),
            "messages": [
                {"role": _text(r), "content": _text(c)}
                for r, c in zip(messages["role"], messages["content"])
            ],
            "line": int(record["line"]),
        }


def shard_options(shard_index: int | None = None, shard_count: int | None = None, drop_remainder: bool = False):
    """This JAX process's shard by default; explicit (index, count) for tests and custom layouts.

    drop_remainder=True makes all shards equally long (every process then runs the same number
    of steps, which synchronous multi-host training needs); False keeps every record, with shard
    sizes differing by at most one.
    """
    if shard_index is None and shard_count is None:
        return grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    if shard_index is None or shard_count is None or not 0 <= shard_index < shard_count:
        raise ValueError(
            f"give both shard_index and shard_count with 0 <= shard_index < shard_count, got "
            f"shard_index={shard_index}, shard_count={shard_count}"
        )
    return grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder)


def preference_loader(
    source,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int = 1,
    batch_size: int | None = None,
    drop_last_batch: bool = False,
    shard: grain.sharding.ShardOptions | None = None,
    worker_count: int = 0,
) -> grain.IterDataset:
    """Decoded pairs of this process's shard as a grain IterDataset (iterate it; its iterators
    have get_state/set_state for checkpointing).

    The shard is every shard_count-th record from shard_index (TFDS already shuffled records when
    writing, so a strided shard is a random subset); each epoch is then shuffled by ``seed``,
    differently per epoch and identically on every rerun. With ``batch_size``, elements are
    lists of pair dicts.
    """
    if len(source) == 0:
        raise ValueError("the preference source is empty; check that the split has parsed pairs")
    for name, value in (("num_epochs", num_epochs), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_epochs is None:
        raise ValueError("num_epochs must be a positive integer; loop over epochs for endless data")
    shard = shard if shard is not None else shard_options()
    ds = grain.MapDataset.source(source)
    if shard.drop_remainder:
        ds = ds[: len(ds) // shard.shard_count * shard.shard_count]
    ds = ds[shard.shard_index :: shard.shard_count]
    if len(ds) == 0:
        raise ValueError(
            f"shard {shard.shard_index} of {shard.shard_count} is empty ({len(source)} records); "
            "use fewer shards or more data"
        )
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(DecodePreference())
    if batch_size is not None:
        ds = ds.batch(batch_size, drop_remainder=drop_last_batch, batch_fn=list)
    out = ds.to_iter_dataset()
    if worker_count > 0:
        # grain's worker processes read absl flags; outside an absl app they are never parsed.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return out
