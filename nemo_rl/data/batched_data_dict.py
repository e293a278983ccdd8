"""A dict of equally long batch tensors that knows how to split itself across ranks."""

from __future__ import annotations

import torch


class BatchedDataDict(dict):
    """Maps names to tensors (or lists) whose first dimension is the batch.

    Keys used for SFT: `input_ids` (B, T) int64, `input_lengths` (B,) int64,
    `token_mask` (B, T) float32, `sample_mask` (B,) float32.
    """

    @property
    def size(self) -> int:
        sizes = {len(value) for value in self.values()}
        if len(sizes) != 1:
            raise ValueError(f"batch entries disagree on batch size: { {k: len(v) for k, v in self.items()} }")
        return sizes.pop()

    def slice(self, start: int, end: int) -> BatchedDataDict:
        return BatchedDataDict({key: value[start:end] for key, value in self.items()})

    def select(self, indices: list[int] | torch.Tensor) -> BatchedDataDict:
        index = torch.as_tensor(indices, dtype=torch.long)
        out = BatchedDataDict()
        for key, value in self.items():
            out[key] = value[index] if isinstance(value, torch.Tensor) else [value[i] for i in index.tolist()]
        return out

    def micro_batches(self, micro_batch_size: int) -> list[BatchedDataDict]:
        return [self.slice(i, i + micro_batch_size) for i in range(0, self.size, micro_batch_size)]

    def shard_by_batch_size(self, num_shards: int) -> list[BatchedDataDict]:
        """Contiguous, equal shards; the caller pads first when the size is not a multiple."""
        if self.size % num_shards:
            raise ValueError(f"batch of {self.size} does not split into {num_shards} equal shards")
        shard = self.size // num_shards
        return [self.slice(i * shard, (i + 1) * shard) for i in range(num_shards)]

    def pad_batch_to_multiple(self, multiple: int) -> BatchedDataDict:
        """Adds rows of zeros (sample_mask 0, so they carry no loss) up to a multiple of `multiple`."""
        missing = -self.size % multiple
        if missing == 0:
            return self
        out = BatchedDataDict()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                filler = torch.zeros((missing, *value.shape[1:]), dtype=value.dtype)
                out[key] = torch.cat([value, filler])
            else:
                out[key] = list(value) + [None] * missing
        return out

    def to(self, device: torch.device | str) -> BatchedDataDict:
        return BatchedDataDict(
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()}
        )

