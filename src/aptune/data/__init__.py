"""Data loading for aptune: text classification tasks and causal-LM data, from local files or the hub.

See :mod:`aptune.data.classification` for the classification loading rules, :mod:`aptune.data.causal_lm`
for causal language-model data (plain text packing, chat formats) and :mod:`aptune.data.rt_polarity` for
the project's demo data.
"""

from aptune.data.causal_lm import (
    LM_FORMATS,
    LMCollator,
    detect_lm_format,
    encode_chat,
    encode_lm_splits,
    lm_collator,
    load_lm_splits,
    make_lm_dataloader,
    to_messages,
    tokenize_chat,
    tokenize_text_blocks,
)
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
    "LM_FORMATS",
    "PAIR_TEXT_FIELDS",
    "SINGLE_TEXT_FIELDS",
    "SPLITS",
    "SUPPORTED_EXTENSIONS",
    "DataError",
    "DataFileNotFoundError",
    "EncodedDataset",
    "LMCollator",
    "PaddingCollator",
    "RtPolarityFiles",
    "TextClassificationData",
    "TextClassificationSplits",
    "detect_lm_format",
    "detect_text_fields",
    "encode_chat",
    "encode_lm_splits",
    "encode_rows",
    "encode_splits",
    "find_split_files",
    "lm_collator",
    "load_hub_dataset",
    "load_lm_splits",
    "load_split_files",
    "load_text_classification",
    "looks_like_hub_name",
    "make_dataloader",
    "make_lm_dataloader",
    "rebuild_rt_polarity",
    "resolve_pad_token_id",
    "rt_polarity_files",
    "to_messages",
    "tokenize_chat",
    "tokenize_text_blocks",
]
