"""Data layer: the SMS Spam Collection (chapter 6), any text-classification CSV and IMDB as GPT-2
token batches.

Submodules import lazily, so that ``spam_lightning.data.table`` (used by preparation workers and
scripts) does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SpamDataModule": "datamodule",
    "SplitData": "datamodule",
    "TextClassificationDataModule": "datamodule",
    "CSVDataModule": "csv_data",
    "read_text_table": "csv_data",
    "IMDBDataModule": "imdb",
    "IMDB_URLS": "imdb",
    "prepare_imdb": "imdb",
    "TokenDataset": "datamodule",
    "LengthGroupedSampler": "sampler",
    "DEFAULT_URLS": "source",
    "DataError": "source",
    "DownloadError": "source",
    "EXPECTED_SHA256": "source",
    "EXPECTED_SIZE": "source",
    "prepare": "table",
    "read_table": "table",
    "read_split_csv": "table",
    "PAD_TOKEN_ID": "tokens",
    "PADDING_MODES": "tokens",
    "Collator": "tokens",
    "collate": "tokens",
    "encode_texts": "tokens",
    "get_tokenizer": "tokens",
    "resolve_max_length": "tokens",
}

__all__ = [
    "CSVDataModule",
    "Collator",
    "DEFAULT_URLS",
    "DataError",
    "DownloadError",
    "EXPECTED_SHA256",
    "EXPECTED_SIZE",
    "IMDBDataModule",
    "IMDB_URLS",
    "LengthGroupedSampler",
    "PADDING_MODES",
    "PAD_TOKEN_ID",
    "SpamDataModule",
    "SplitData",
    "TextClassificationDataModule",
    "TokenDataset",
    "collate",
    "encode_texts",
    "get_tokenizer",
    "prepare",
    "prepare_imdb",
    "read_split_csv",
    "read_table",
    "read_text_table",
    "resolve_max_length",
]

if TYPE_CHECKING:
    from spam_lightning.data.csv_data import CSVDataModule, read_text_table
    from spam_lightning.data.datamodule import (
        SpamDataModule,
        SplitData,
        TextClassificationDataModule,
        TokenDataset,
    )
    from spam_lightning.data.imdb import IMDB_URLS, IMDBDataModule, prepare_imdb
    from spam_lightning.data.sampler import LengthGroupedSampler
    from spam_lightning.data.source import (
        DEFAULT_URLS,
        EXPECTED_SHA256,
        EXPECTED_SIZE,
        DataError,
        DownloadError,
    )
    from spam_lightning.data.table import prepare, read_split_csv, read_table
    from spam_lightning.data.tokens import (
        PAD_TOKEN_ID,
        PADDING_MODES,
        Collator,
        collate,
        encode_texts,
        get_tokenizer,
        resolve_max_length,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
