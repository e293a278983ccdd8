"""PreservingDataset keeps rows as written."""

from __future__ import annotations

from nemo_rl.data.datasets.preserving import PreservingDataset

ROWS = [{"args": {"query": "x"}}, {"args": {"expression": "2+2", "precision": 2}}]


def test_rows_are_kept_exactly():
    dataset = PreservingDataset(ROWS)
    assert len(dataset) == 2 and list(dataset) == ROWS
    assert dataset[0] == {"args": {"query": "x"}}
    assert dataset[1]["args"] == {"expression": "2+2", "precision": 2}


def test_select():
    dataset = PreservingDataset(ROWS)
    selected = dataset.select([1])
    assert isinstance(selected, PreservingDataset) and selected.to_list() == [ROWS[1]]
