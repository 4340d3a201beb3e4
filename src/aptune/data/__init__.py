"""Data loading for aptune: text classification tasks from local files or the Hugging Face hub.

See :mod:`aptune.data.classification` for the loading rules and :mod:`aptune.data.rt_polarity` for
the project's demo data.
"""

from aptune.data.classification import (
    PAIR_TEXT_FIELDS,
    SINGLE_TEXT_FIELDS,
    SPLITS,
    SUPPORTED_EXTENSIONS,
    EncodedDataset,
    PaddingCollator,
    TextClassificationData,
    TextClassificationSplits,
    detect_text_fields,
    encode_rows,
    encode_splits,
    find_split_files,
    load_hub_dataset,
    load_split_files,
    load_text_classification,
    looks_like_hub_name,
    make_dataloader,
    resolve_pad_token_id,
)
from aptune.data.errors import DataError, DataFileNotFoundError
from aptune.data.rt_polarity import RtPolarityFiles, rebuild_rt_polarity, rt_polarity_files

__all__ = [
    "PAIR_TEXT_FIELDS",
    "SINGLE_TEXT_FIELDS",
    "SPLITS",
    "SUPPORTED_EXTENSIONS",
    "DataError",
    "DataFileNotFoundError",
    "EncodedDataset",
    "PaddingCollator",
    "RtPolarityFiles",
    "TextClassificationData",
    "TextClassificationSplits",
    "detect_text_fields",
    "encode_rows",
    "encode_splits",
    "find_split_files",
    "load_hub_dataset",
    "load_split_files",
    "load_text_classification",
    "looks_like_hub_name",
    "make_dataloader",
    "rebuild_rt_polarity",
    "resolve_pad_token_id",
    "rt_polarity_files",
]
