"""``dataset_prepared_path``: the tokenized datasets of a run, cached on disk (Axolotl's key).

A sweep or a rerun on the same data reads them back instead of tokenizing again. The cache folder
holds one subfolder per key, :func:`mft_plugin.digest.data_key`: the data files and the tokenizer
by content and every config key that may shape a row (all but those declared unable to); a changed
input gives a new key, never a stale hit (the key does not see the code of a format: after changing a
format, delete the folder). A subfolder is written under a temporary name and renamed into place, so a crash leaves either a
complete cache or none; one that cannot be read back is logged and rebuilt.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, load_from_disk


logger = logging.getLogger(__name__)

TRAIN = "train"


def prepared_datasets(folder: str | None, key: str, build: Callable[[], dict[str, Dataset]]) -> dict[str, Dataset]:
    """The datasets ``build`` returns, read from ``folder/key`` when a complete copy is there."""
    if folder is None:
        return build()
    target = Path(folder).expanduser() / key
    if target.is_dir():
        try:
            loaded = {part.name: load_from_disk(str(part)) for part in sorted(target.iterdir()) if part.is_dir()}
            if TRAIN not in loaded:
                raise FileNotFoundError(f"no {TRAIN!r} part")
            return loaded
        except Exception as error:  # a damaged cache is rebuilt, never trusted
            logger.warning("dataset_prepared_path: %s cannot be read (%s); tokenizing again", target, error)
            shutil.rmtree(target, ignore_errors=True)
    datasets = build()
    temporary = target.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    for name, dataset in datasets.items():
        dataset.save_to_disk(str(temporary / name))
    try:
        os.replace(temporary, target)
    except OSError:  # another process (a rank of the same run) renamed its copy first
        shutil.rmtree(temporary, ignore_errors=True)
    logger.info("dataset_prepared_path: tokenized data saved in %s", target)
    return datasets
