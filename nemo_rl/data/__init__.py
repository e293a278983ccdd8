"""Data: datasets by name -> chat rows -> token ids with a loss mask -> padded batches.

    from nemo_rl.data.datasets import load_datasets            # DataConfig -> SFTDatasets(train, validation, task_spec)
    from nemo_rl.data.tokenizer import get_tokenizer           # TokenizerConfig -> tokenizer with the chat template set
    from nemo_rl.data.processors import TokenizationOptions    # MasterConfig -> how rows become tokens
    from nemo_rl.data.processors import SFTDataset             # rows -> tokenized DatumSpecs (eagerly, errors first)
    from nemo_rl.data.collate import sft_collate               # DatumSpecs -> BatchedDataDict
    from nemo_rl.data.dataloaders import build_dataloaders     # all of the above -> train and validation loaders

Importing this package imports only the light interfaces; the modules above are imported by name.
"""

from nemo_rl.data.interfaces import DataError, DatumSpec, TaskDataSpec

__all__ = ["DataError", "DatumSpec", "TaskDataSpec"]
