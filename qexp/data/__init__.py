"""Data sets: the DataModule interface and its builders (one per conf/dataset/*.yaml)."""

from qexp.data.base import DataInfo, DataModule, TensorDataModule

__all__ = ["DataInfo", "DataModule", "TensorDataModule"]
