"""UD2M training (docs/method.md §7): Lightning wiring only. For now, the DataModules of :mod:`ud2m.training.data`."""

from ud2m.training.data import ImageFolderImages, SyntheticImages, WebDatasetImages

__all__ = ["ImageFolderImages", "SyntheticImages", "WebDatasetImages"]
