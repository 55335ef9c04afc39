"""HH-RLHF: a fixture in the official jsonl.gz format, built by TFDS into array_record, read back
through tfds.data_source and grain (worker_count=0), with per-process sharding."""

import gzip
import json

import pytest
import tensorflow_datasets as tfds

from iapo_jax.data.hh_rlhf import HhRlhf
from iapo_jax.data.hh_rlhf_parse import MalformedPreferenceError, parse_pair
from iapo_jax.data.hh_rlhf_pipeline import hh_rlhf_source, preference_loader, shard_options
from iapo_jax.data.tokenize import chat_messages

SUBSET = "harmless-base"
NUM_GOOD = 21


def _pair(i):
    if i % 3 == 0:  # multi-turn
        shared = (
            f"\n\nHuman: Hi there {i}\n\nAssistant: Hello! How can I help?"
            f"\n\nHuman: How do I bake bread number {i}?\n\nAssistant:"
        )
    else:
        shared = f"\n\nHuman: What is {i} plus {i}?\n\nAssistant:"
    return {"chosen": shared + f" It is {2 * i}.", "rejected": shared + " I will not tell you."}


# (line content, reason it is bad); written between good lines.
BAD_LINES = [
    ('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo"}', "missing rejected"),
    ('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo", "rejected": ', "truncated JSON"),
    (json.dumps({"chosen": "\n\nHuman:   \n\nAssistant: a", "rejected": "\n\nHuman:   \n\nAssistant: b"}), "empty human turn"),
    (json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: no"}), "empty final turn"),
    (json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}), "prompt mismatch"),
]
FIRST_BAD_LINE = 4  # 1-based line number of BAD_LINES[0] in train.jsonl.gz


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def hh_dirs(tmp_path_factory):
    """(manual_dir with the official layout, data_dir prepared by the builder, good line numbers)."""
    manual = tmp_path_factory.mktemp("hh_manual")
    lines, good_lines = [], {}
    bad = iter(BAD_LINES)
    for i in range(NUM_GOOD):
        lines.append(json.dumps(_pair(i)))
        good_lines[len(lines)] = i
        if i % 4 == 2:
            lines.append(next(bad, ("", ""))[0])
    lines.extend(line for line, _ in bad)
    lines = [line for line in lines if line]
    _write(manual / SUBSET / "train.jsonl.gz", lines)
    _write(manual / SUBSET / "test.jsonl.gz", [json.dumps(_pair(100)), json.dumps(_pair(101))])
    data = tmp_path_factory.mktemp("hh_data")
    builder = HhRlhf(config=SUBSET, data_dir=str(data))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return manual, data, good_lines


def test_fixture_layout(hh_dirs):
    manual, _, good_lines = hh_dirs
    raw = gzip.open(manual / SUBSET / "train.jsonl.gz", "rt").read().splitlines()
    assert len(raw) == NUM_GOOD + len(BAD_LINES)
    assert raw[FIRST_BAD_LINE - 1] == BAD_LINES[0][0]
    assert len(good_lines) == NUM_GOOD


def test_parsed_records_through_tfds_data_source(hh_dirs):
    _, data, good_lines = hh_dirs
    source = tfds.data_source(f"hh_rlhf/{SUBSET}", data_dir=str(data), split="train")
    assert len(source) == NUM_GOOD
    records = {int(r["line"]): r for r in (source[i] for i in range(len(source)))}
    assert set(records) == set(good_lines)
    for line, i in good_lines.items():
        record = records[line]
        want_prompt = _pair(i)["chosen"][: _pair(i)["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")]
        assert record["prompt"].decode() == want_prompt
        assert record["chosen"].decode() == f"It is {2 * i}."
        assert record["rejected"].decode() == "I will not tell you."
        roles = [r.decode() for r in record["messages"]["role"]]
        contents = [c.decode() for c in record["messages"]["content"]]
        if i % 3 == 0:
            assert roles == ["user", "assistant", "user"]
            assert contents == [f"Hi there {i}", "Hello! How can I help?", f"How do I bake bread number {i}?"]
        else:
            assert roles == ["user"] and contents == [f"What is {i} plus {i}?"]
    test = tfds.data_source(f"hh_rlhf/{SUBSET}", data_dir=str(data), split="test")
    assert len(test) == 2


def test_skip_counts_are_saved_with_the_dataset(hh_dirs):
    _, data, _ = hh_dirs
    reloaded = tfds.builder(f"hh_rlhf/{SUBSET}", data_dir=str(data))
    assert reloaded.info.metadata["skipped"] == {"train": len(BAD_LINES), "test": 0}
    assert reloaded.info.file_format.value == "array_record"


def test_strict_mode_names_file_and_line(hh_dirs, tmp_path):
    manual, _, _ = hh_dirs
    builder = HhRlhf(config=SUBSET, data_dir=str(tmp_path), strict=True)
    with pytest.raises(MalformedPreferenceError, match=rf"train\.jsonl\.gz:{FIRST_BAD_LINE}: missing or non-string field 'rejected'"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert not HhRlhf(config=SUBSET, data_dir=str(tmp_path)).is_prepared()  # nothing half-written


def test_grain_shards_are_disjoint_and_cover_the_split(hh_dirs):
    _, data, good_lines = hh_dirs
    source = hh_rlhf_source(SUBSET, "train", data_dir=data)
    shards = [
        [r["line"] for r in preference_loader(source, seed=7, shard=shard_options(k, 2, drop_remainder=False))]
        for k in range(2)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(good_lines)
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    even = [list(preference_loader(source, seed=7, shard=shard_options(k, 2, drop_remainder=True))) for k in range(2)]
    assert len(even[0]) == len(even[1]) == NUM_GOOD // 2  # drop_remainder: equal steps per process
    # Default: shard by JAX process; a single process reads everything.
    assert sorted(r["line"] for r in preference_loader(source, seed=7)) == sorted(good_lines)


def test_grain_shuffle_is_deterministic_by_seed(hh_dirs):
    _, data, _ = hh_dirs
    source = hh_rlhf_source(SUBSET, "train", data_dir=data)

    def order(seed, **kw):
        return [r["line"] for r in preference_loader(source, seed=seed, **kw)]

    assert order(3) == order(3)
    assert order(3) != order(4) and sorted(order(3)) == sorted(order(4))
    two_epochs = order(3, num_epochs=2)
    assert len(two_epochs) == 2 * NUM_GOOD and sorted(set(two_epochs)) == sorted(order(3))


def test_grain_records_are_decoded_and_batched(hh_dirs):
    _, data, _ = hh_dirs
    source = hh_rlhf_source(SUBSET, "test", data_dir=data)
    batches = list(preference_loader(source, seed=0, shuffle=False, batch_size=2))
    assert len(batches) == 1 and len(batches[0]) == 2
    record = batches[0][0]
    assert isinstance(record["prompt"], str) and isinstance(record["chosen"], str)
    # Messages go straight into a chat template.
    assert chat_messages(record["messages"])[-1]["role"] == "user"


def test_source_errors(hh_dirs, tmp_path):
    manual, _, _ = hh_dirs
    with pytest.raises(ValueError, match="unknown HH-RLHF subset 'red-team-attempts'"):
        HhRlhf(config="red-team-attempts", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pass manual_dir"):
        hh_rlhf_source("helpful-base", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no train\.jsonl\.gz or train\.jsonl in .*helpful-base"):
        hh_rlhf_source("helpful-base", "train", data_dir=tmp_path, manual_dir=manual)
    with pytest.raises(ValueError, match="split must be one of"):
        hh_rlhf_source(SUBSET, "validation", data_dir=tmp_path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "field 'rejected'"),
        ({"chosen": "no markers", "rejected": "no markers"}, "no"),
        ({"chosen": "Intro\n\nHuman: a\n\nAssistant: b", "rejected": "Intro\n\nHuman: a\n\nAssistant: c"}, "does not start"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: \n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: \n\nAssistant: c"}, "empty Assistant turn"),
        ([1, 2], "JSON object"),
    ],
)
def test_parse_pair_rejects_malformed(record, message):
    with pytest.raises(MalformedPreferenceError, match=message):
        parse_pair(record)
