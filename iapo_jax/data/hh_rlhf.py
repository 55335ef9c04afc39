"""TFDS builder for Anthropic HH-RLHF from the official jsonl(.gz) files in a local folder.

Expected layout (as in https://github.com/anthropics/hh-rlhf), passed as ``manual_dir``:

    <manual_dir>/helpful-base/train.jsonl.gz     <manual_dir>/helpful-base/test.jsonl.gz
    <manual_dir>/harmless-base/...  helpful-online/...  helpful-rejection-sampled/...

red-team-attempts has another format (no chosen/rejected pairs) and is not a config. The builder
writes array_record, so preparing and reading (``tfds.data_source``) need no TensorFlow. Bad
lines are skipped and counted in ``builder.info.metadata["skipped"][split]`` (saved with the
dataset), or, with ``strict=True``, rejected with the file and line number.

    builder = HhRlhf(config="harmless-base", data_dir=out)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=src))
    source = builder.as_data_source(split="train")
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from iapo_jax.data.hh_rlhf_parse import find_split_file, read_pairs

log = logging.getLogger(__name__)

SUBSETS = ("helpful-base", "harmless-base", "helpful-online", "helpful-rejection-sampled")
SPLITS = ("train", "test")


class HhRlhf(tfds.core.GeneratorBasedBuilder):
    """Anthropic HH-RLHF preference pairs: prompt, chosen, rejected, and the prompt as messages."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Pairs parsed from the official jsonl.gz files."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"HH-RLHF {name}") for name in SUBSETS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the subset folders (helpful-base, harmless-base, helpful-online, "
        "helpful-rejection-sampled) from https://github.com/anthropics/hh-rlhf and pass their "
        "parent folder as manual_dir (tfds.download.DownloadConfig(manual_dir=...))."
    )

    # TFDS's own code_path lookup imports the `importlib_resources` backport, which it only
    # declares for Python < 3.9; the builder's location is known, so state it.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def __init__(self, *, config=None, strict: bool = False, file_format=None, **kwargs):
        """config: a subset name; strict: fail on the first bad line instead of skipping it (a
        builder option, not a config, because it changes no output); array_record by default."""
        if isinstance(config, str) and config not in SUBSETS:
            raise ValueError(
                f"unknown HH-RLHF subset {config!r}; choose one of {', '.join(SUBSETS)} "
                "(red-team-attempts has no chosen/rejected pairs)"
            )
        self.strict = bool(strict)
        super().__init__(config=config, file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "prompt": tfds.features.Text(),
                    "chosen": tfds.features.Text(),
                    "rejected": tfds.features.Text(),
                    "messages": tfds.features.Sequence(
                        {"role": tfds.features.Text(), "content": tfds.features.Text()}
                    ),
                    "line": tfds.features.Scalar(dtype=np.int64, doc="1-based line in the source file"),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/anthropics/hh-rlhf",
            citation="Bai et al. 2022, Training a Helpful and Harmless Assistant with RLHF (arXiv 2204.05862)",
        )

    def _split_generators(self, dl_manager):
        folder = Path(dl_manager.manual_dir) / self.builder_config.name
        # Resolve both files before generating anything, so a missing one fails up front.
        files = {split: find_split_file(folder, split) for split in SPLITS}
        self.info.metadata["skipped"] = {}
        return {split: self._generate_examples(path, split) for split, path in files.items()}

    def _generate_examples(self, path: Path, split: str):
        skipped: list[tuple[int, str]] = []
        for line_no, pair in read_pairs(path, strict=self.strict, skipped=skipped):
            yield line_no, {
                "prompt": pair.prompt,
                "chosen": pair.chosen,
                "rejected": pair.rejected,
                "messages": {
                    "role": [m["role"] for m in pair.messages],
                    "content": [m["content"] for m in pair.messages],
                },
                "line": line_no,
            }
        self.info.metadata["skipped"][split] = len(skipped)
        if skipped:
            first_line, first_reason = skipped[0]
            log.warning(
                "HH-RLHF %s/%s: skipped %d malformed line(s) of %s (first: line %d, %s)",
                self.builder_config.name, split, len(skipped), path, first_line, first_reason,
            )
