"""Training data for UD2M (docs/method.md §7.6-7.8; issue [ud2m], "Data"): Lightning DataModules that deliver
clean images on the library's [-1, 1] scale (§1.1), plus stored measurements for paired shards.

Every DataModule yields batches ``{"x": (B, C, H, W) float32 on [-1, 1], "key": list[str]}``; samples from paired
shards (``data/make_shards.py --operator ...``) also carry ``"y"`` (the float32 measurement on the internal scale)
and ``"params"`` (one dict per sample: ``operator`` = ``{class_path, init_args}``, ``sigma_y``, ``seed``, ``preset``;
rebuild the operator with :func:`ud2m.operators.presets.instantiate_operator`); shards of ``--simulate <task>`` carry
``{simulate, sigma_y, seed, param_seed, values}`` instead (replay with
:func:`ud2m.operators.simulate.simulate_task`).

- :class:`WebDatasetImages` streams WebDataset shards (local paths, brace patterns, ``pipe:``/http URLs).
- :class:`ImageFolderImages` serves a small folder of images (or ``skimage:<name>`` photographs) from memory.
- :class:`SyntheticImages` generates smooth random images from a seed, for tests.

The degraded-on-the-fly path (a random operator per batch from :mod:`ud2m.operators.random`, §2.7 and §7.8, and
``y = measure(op, x0, sigma_y, generator)``, §7.6 step 3) lives in the LightningModule's training step, not here:
the operator must be the same object in the measurement, every prox, ``lift(y)`` and the logs.

Randomness (shard order, shuffle buffer, crops, flips) is seeded from ``seed``, the epoch and the (rank, worker)
pair, so two runs with the same settings read the same stream; the global RNGs are never touched. Training loaders
are :class:`ResumableLoader` objects: Lightning stores their position in every checkpoint, and a run killed and resumed
reads exactly the batches an uninterrupted run reads.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from ud2m.io import IMAGE_SUFFIXES, PHOTO_PREFIXES, discover_images, load_image, source_stem, split_train_val
from ud2m.utils import seed_for

logger = logging.getLogger(__name__)

#: Luma weights (ITU-R 601), the same as :func:`ud2m.io.load_image` uses for RGB -> gray.
_LUMA = (0.299, 0.587, 0.114)


class CorruptSample(ValueError):
    """A shard member that cannot be decoded (bad PNG, bad JSON, bad ``.npy``, missing keys)."""


# ------------------------------------------------------------------------------------------------ shared helpers


def worker_id() -> int:
    """This process's DataLoader worker index (0 in the main process)."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def worker_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the DataLoader worker index (DataModules fold the rank into seed)."""
    return torch.Generator().manual_seed(wds.utils.make_seed(seed, worker_id()))


def rank_and_world_size(trainer=None) -> tuple[int, int]:
    """(global rank, world size): from the Trainer when attached, else as webdataset reads them (RANK/WORLD_SIZE
    environment variables, then ``torch.distributed``)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    return rank, world_size


def split_by_rank(src: Iterator[dict], *, rank: int, world_size: int) -> Iterator[dict]:
    """``wds.split_by_node`` with the rank fixed at setup: shard ``i`` goes to rank ``i % world_size``.

    Fixing the rank in the main process keeps the split right in spawned DataLoader workers, where
    ``torch.distributed`` is not initialised and Lightning's DDP launcher sets ``WORLD_SIZE`` but not ``RANK``.
    """
    yield from itertools.islice(src, rank, None, world_size)


def to_channels(x: torch.Tensor, channels: int, source: str = "image") -> torch.Tensor:
    """Convert a ``(C, H, W)`` image to ``channels`` (1: luma, 3: replicated gray); other counts are errors."""
    if x.shape[0] == channels:
        return x
    if channels == 1 and x.shape[0] == 3:
        return (x * x.new_tensor(_LUMA).view(3, 1, 1)).sum(0, keepdim=True)
    if channels == 3 and x.shape[0] == 1:
        return x.expand(3, -1, -1).contiguous()
    raise ValueError(f"{source}: cannot convert {x.shape[0]} channels to {channels} (expected 1 or 3)")


def upscale_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upscaling of a ``(C, H, W)`` image so that its shorter side equals ``size`` (clamped to [-1, 1])."""
    H, W = x.shape[-2:]
    scale = size / min(H, W)
    shape = (max(size, round(H * scale)), max(size, round(W * scale)))
    return F.interpolate(x[None], size=shape, mode="bicubic", align_corners=False)[0].clamp(-1.0, 1.0)


class CropFlip:
    """Square crop to ``image_size``: random crop and horizontal flip for training, central crop otherwise.

    Two optional augmentations for small training sets [ours], off by default (so the crops of earlier configs are
    unchanged, draw for draw):

    * ``rot90``: a random element of the dihedral group, i.e. a rotation by a multiple of 90° on top of the flip
      (8 orientations). Operators whose kernels share the symmetry (isotropic blur, SR with a symmetric filter,
      random masks) are equivariant under it, so the task is unchanged.
    * ``zoom``: ``(lo, hi)`` with ``0 < lo <= hi <= 1``: the crop window's side is ``image_size / s`` for
      ``s ~ U(lo, hi)`` (clipped to the image), resized to ``image_size`` with antialiasing: the same photograph seen
      at up to ``1 / lo`` times coarser scale, i.e. new content statistics per crop.

    The generator is created lazily in the process that first calls the transform, so every DataLoader worker gets
    its own stream (:func:`worker_generator`; pass a rank-dependent ``seed`` for distinct ranks).

    Args:
        image_size: output side.
        train: random crop (and flip) rather than the central crop.
        seed: base seed.
        random_flip: flip horizontally with probability 1/2 when training.
        rot90: also rotate by a random multiple of 90° when training.
        zoom: random zoom-out range ``(lo, hi)`` when training (None: native resolution).
    """

    def __init__(
        self,
        image_size: int,
        *,
        train: bool,
        seed: int = 0,
        random_flip: bool = True,
        rot90: bool = False,
        zoom: Sequence[float] | None = None,
    ) -> None:
        self.image_size, self.train, self.seed, self.random_flip = int(image_size), train, seed, random_flip
        self.rot90 = bool(rot90)
        self.zoom = None if zoom is None else (float(zoom[0]), float(zoom[1]))
        if self.zoom is not None and not 0.0 < self.zoom[0] <= self.zoom[1] <= 1.0:
            raise ValueError(f"CropFlip: zoom must be (lo, hi) with 0 < lo <= hi <= 1, got {tuple(zoom)}")
        self._generator: torch.Generator | None = None

    def __call__(
        self, x: torch.Tensor, source: str = "image", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Crop (and maybe flip) one ``(C, H, W)`` image (``generator``: this sample's own, instead of the stream's)."""
        H, W = x.shape[-2:]
        s = self.image_size
        if min(H, W) < s:
            raise ValueError(f"{source}: image {H}x{W} is smaller than image_size={s}")
        if not self.train:
            top, left = (H - s) // 2, (W - s) // 2
            return x[:, top : top + s, left : left + s]
        if generator is None and self._generator is None:
            self._generator = worker_generator(self.seed)
        generator = generator or self._generator
        w = s
        if self.zoom is not None:  # drawn first: a window of side s / scale
            lo, hi = self.zoom
            scale = lo + (hi - lo) * float(torch.rand((), generator=generator))
            w = min(H, W, max(s, round(s / scale)))
        top, left, flip = (int(torch.randint(0, n, (1,), generator=generator)) for n in (H - w + 1, W - w + 1, 2))
        x = x[:, top : top + w, left : left + w]
        if w != s:
            x = F.interpolate(x[None], size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0]
        if flip and self.random_flip:
            x = x.flip(-1)
        if self.rot90:
            x = x.rot90(int(torch.randint(0, 4, (1,), generator=generator)), (-2, -1))
        return x


def collate_samples(samples: list[dict]) -> dict:
    """Stack decoded samples into a batch ``{"x", "key"}`` (+ ``"y"``, ``"params"`` when every sample is paired)."""
    batch = {"x": torch.stack([s["x"] for s in samples]), "key": [s["key"] for s in samples]}
    paired = ["y" in s for s in samples]
    if any(paired):
        if not all(paired):
            raise ValueError(f"a batch mixes paired and clean-only samples: keys {batch['key']}")
        batch["y"] = torch.stack([s["y"] for s in samples])
        batch["params"] = [s["params"] for s in samples]
    return batch


def _dataloader_kwargs(num_workers: int) -> dict:
    return {"num_workers": num_workers, "persistent_workers": num_workers > 0}


# ------------------------------------------------------------------------------------------------ exact resume

#: Key of the ``(epoch, index)`` position that :class:`ResumableLoader` adds to each training batch.
POSITION = "position"


class ResumableLoader:
    """Training batches as a pure function of (seed, rank, epoch, index), with their position in checkpoints.

    ``make_epoch(epoch, skip)`` builds epoch ``epoch``'s batches from index ``skip`` on, with every random stream
    (sample order, shard order, shuffle buffer, crops) seeded from the epoch, so an epoch does not depend on what came
    before it. Each batch carries ``batch["position"] = (epoch, index)``; :class:`ResumableData`'s
    ``on_before_batch_transfer`` removes it and :meth:`mark` records it when the batch is *trained on* (Lightning
    fetches one batch ahead, so counting yields would be off by one). Lightning saves :meth:`state_dict` in every
    checkpoint (its ``_Stateful`` protocol) and calls :meth:`load_state_dict` on resume, after which the next
    iteration continues the same epoch after the last trained batch: killed and resumed, a run reads exactly the
    batches of an uninterrupted run (tested with a real SIGKILL).

    Args:
        make_epoch: ``(epoch, skip) -> iterable of batch dicts``.
        num_batches: batches per epoch (``None``: unknown, e.g. one pass over shards, or endless).
    """

    def __init__(self, make_epoch: Callable[[int, int], Iterable[dict]], num_batches: int | None = None) -> None:
        self.make_epoch, self.num_batches = make_epoch, num_batches
        self.epoch, self.trained = 0, 0  # position of the next batch to train on: (epoch, trained)
        self.epoch_length: int | None = num_batches  # known once an epoch of unknown length ran out

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("ResumableLoader: an epoch of unknown length has no len()")
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        if self.epoch_length is not None and self.trained >= self.epoch_length:  # the last epoch was finished
            self.epoch, self.trained, self.epoch_length = self.epoch + 1, 0, self.num_batches
        return self._batches(self.epoch, self.trained)

    def _batches(self, epoch: int, skip: int) -> Iterator[dict]:
        index = skip
        for batch in self.make_epoch(epoch, skip):
            batch[POSITION] = (epoch, index)
            index += 1
            yield batch
        if self.epoch == epoch and self.num_batches is None:  # ran out: now this epoch's length is known
            self.epoch_length = index

    def mark(self, position: tuple[int, int]) -> None:
        """Record that batch ``(epoch, index)`` is being trained on."""
        self.epoch, self.trained = (int(v) for v in position)
        self.trained += 1

    def state_dict(self) -> dict[str, int | None]:
        """``{"epoch", "trained", "epoch_length"}``: where the next batch comes from."""
        return {"epoch": self.epoch, "trained": self.trained, "epoch_length": self.epoch_length}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        """Continue from a checkpoint's position."""
        self.epoch, self.trained, self.epoch_length = int(state["epoch"]), int(state["trained"]), state["epoch_length"]


class ResumableData(LightningDataModule):
    """A DataModule whose training loader is a :class:`ResumableLoader` (:meth:`resumable`); its
    ``on_before_batch_transfer`` records the position of each batch trained on."""

    _train_loader: ResumableLoader | None = None

    def resumable(self, make_epoch: Callable[[int, int], Iterable[dict]], num_batches: int | None) -> ResumableLoader:
        """Wrap ``make_epoch`` as this module's training loader."""
        self._train_loader = ResumableLoader(make_epoch, num_batches)
        return self._train_loader

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Remove ``batch["position"]`` and mark it trained on."""
        if isinstance(batch, dict) and POSITION in batch:
            position = batch.pop(POSITION)
            if self._train_loader is not None:
                self._train_loader.mark(position)
        return batch


def epoch_order(n: int, *, seed: int, epoch: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """This rank's ``(item, crop seed)`` pairs of one epoch over ``n`` items: one permutation seeded by (seed, epoch)
    shared by all ranks, split into ``world_size`` equal parts (the remainder is dropped), and a seed per position."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, epoch)))
    per_rank = n // world_size
    mine = perm[rank * per_rank : (rank + 1) * per_rank].tolist()
    return [(i, seed_for(seed, epoch, rank, position)) for position, i in enumerate(mine)]


def map_style_epoch(data: LightningDataModule, dataset: Dataset, epoch: int, skip: int, *, drop_last: bool):
    """A DataLoader over epoch ``epoch`` of a map-style dataset from batch ``skip`` on (:func:`epoch_order`)."""
    rank, world_size = rank_and_world_size(getattr(data, "trainer", None))
    order = epoch_order(len(dataset), seed=data.seed, epoch=epoch, rank=rank, world_size=world_size)
    B = data.batch_size
    order = order[: len(order) // B * B] if drop_last else order
    return DataLoader(dataset, batch_size=B, sampler=order[skip * B :], num_workers=data.num_workers)


def map_style_batches(data: LightningDataModule, n: int, *, drop_last: bool) -> int:
    """Batches per epoch and rank of :func:`map_style_epoch`."""
    per_rank = n // rank_and_world_size(getattr(data, "trainer", None))[1]
    return per_rank // data.batch_size if drop_last else -(-per_rank // data.batch_size)


# ------------------------------------------------------------------------------------------------ WebDataset


class SkippedSamples:
    """Exception handler for webdataset stages: logs one warning per corrupt item, counts it and skips it.

    ``__call__`` serves the tar-reading stages (any exception there is a damaged or unreachable shard);
    :meth:`decode_errors` serves the decoding stage and re-raises everything that is not a :class:`CorruptSample`,
    so configuration errors (e.g. ``image_size`` larger than the stored images) still stop the run.
    """

    def __init__(self) -> None:
        self.count = 0
        self._reported = 0

    def __call__(self, exn: BaseException) -> bool:
        """Count, log and skip (returns True, the webdataset convention for "continue")."""
        self.count += 1
        logger.warning("skipped corrupt shard data (%s): %s", type(exn).__name__, exn)
        return True

    def decode_errors(self, exn: BaseException) -> bool:
        """Like ``__call__`` for :class:`CorruptSample`; re-raises any other exception."""
        if not isinstance(exn, CorruptSample):
            raise exn
        return self(exn)

    def shard_read(self, url: str, read: int, expected: int | None, errors: int) -> None:
        """After one shard: count ``expected - read`` samples as lost when the shard came short (a truncated tar loses
        every member after the cut, but raises one error), in place of the ``errors`` it raised."""
        if expected is None or read >= expected:
            return
        self.count += max(expected - read, errors) - errors
        logger.warning("shard %s: read %d of its %d samples, %d lost (truncated or corrupt)", url, read, expected,
                       expected - read)  # fmt: skip

    def take_new(self) -> int:
        """Number of items skipped since the previous call (used to report counts out of DataLoader workers)."""
        new, self._reported = self.count - self._reported, self.count
        return new


def shard_sizes(urls: list[str]) -> dict[str, int]:
    """Samples per shard from the ``info.json`` that ``data/make_shards.py`` writes next to its shards (``"shards"``),
    keyed by normalised path; empty for shards without one (then a truncated shard counts as one skipped item)."""
    sizes: dict[str, int] = {}
    for folder in {Path(u).parent for u in urls if urlparse(u).scheme == ""}:
        info = folder / "info.json"
        try:
            shards = json.loads(info.read_text()).get("shards", {}) if info.is_file() else {}
        except (OSError, ValueError) as err:
            logger.warning("%s: unreadable (%s); lost samples of its shards are not counted", info, err)
            continue
        sizes.update({os.path.normpath(folder / name): int(n) for name, n in shards.items()})
    return sizes


class ReadShards:
    """``wds.tarfile_to_samples`` one shard at a time, so that a shard that comes short of its ``info.json`` size
    (truncated: the tar reader stops at the cut) has its lost samples counted (:meth:`SkippedSamples.shard_read`)."""

    def __init__(self, handler: SkippedSamples, sizes: dict[str, int]) -> None:
        self.handler, self.sizes = handler, sizes

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        """Shard dicts (``{"url": ...}``) in, samples out."""
        for shard in src:
            errors, read = self.handler.count, 0
            for sample in wds.tarfile_to_samples(handler=self.handler)(iter([shard])):
                read += 1
                yield sample
            expected = self.sizes.get(os.path.normpath(shard["url"]))
            self.handler.shard_read(shard["url"], read, expected, self.handler.count - errors)


def decode_sample(sample: dict) -> dict:
    """Decode one raw webdataset sample: ``png`` -> uint8 ``(C, H, W)``, ``json`` -> dict, ``y.npy`` -> float32.

    Raises:
        CorruptSample: undecodable PNG/JSON/NPY or a missing ``png``/``json`` member (the message names the shard
            and the key).
    """
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    try:
        from PIL import Image

        with Image.open(io.BytesIO(sample["png"])) as img:
            arr = np.asarray(img.convert("L" if img.mode in ("L", "1") else "RGB"))
        meta = json.loads(sample["json"])
        y = np.load(io.BytesIO(sample["y.npy"]), allow_pickle=False) if "y.npy" in sample else None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) on bad bytes
        raise CorruptSample(f"shard {url}, key {key}: {type(err).__name__}: {err}") from err
    out = {"key": key, "url": url, "u8": torch.from_numpy(np.atleast_3d(arr).transpose(2, 0, 1).copy())}
    if y is not None:
        if "params" not in meta:
            raise CorruptSample(f"shard {url}, key {key}: y.npy present but the json has no 'params'")
        out.update(y=torch.from_numpy(np.asarray(y, dtype=np.float32)), params=meta["params"])
    return out


class ShardTransform:
    """uint8 sample -> ``x`` on [-1, 1] with ``channels`` and a crop to ``image_size`` (:class:`CropFlip`).

    Paired samples are neither cropped nor flipped (y was measured on the stored image); their stored size and
    channel count must equal ``image_size`` and ``channels``.
    """

    def __init__(
        self, image_size: int, channels: int, *, train: bool, seed: int, random_flip: bool = True, **augment
    ) -> None:
        self.channels = channels
        self.crop = CropFlip(image_size, train=train, seed=seed, random_flip=random_flip, **augment)

    def __call__(self, sample: dict) -> dict:
        """Return ``{"x", "key"}`` (+ ``"y"``, ``"params"``)."""
        where = f"shard {sample['url']}, key {sample['key']}"
        x = sample.pop("u8").float().div(255.0).mul(2.0).sub(1.0)  # §1.1: x_int = 2 x_01 - 1
        if "y" not in sample:
            return {"x": self.crop(to_channels(x, self.channels, where), where), "key": sample["key"]}
        s = self.crop.image_size
        if x.shape != (self.channels, s, s):
            raise ValueError(
                f"{where}: paired samples cannot be cropped or converted (y was measured on the stored image); "
                f"stored {tuple(x.shape)}, requested ({self.channels}, {s}, {s}): set image_size/channels to match"
            )
        return {"x": x, "key": sample["key"], "y": sample["y"], "params": sample["params"]}


class SeededShuffle:
    """Shuffle buffer seeded from (seed, DataLoader worker, epoch): a reproducible stream per worker."""

    def __init__(self, bufsize: int, seed: int) -> None:
        self.bufsize, self.seed, self.epoch = bufsize, seed, -1

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        """Apply the shuffle buffer to a sample iterator."""
        self.epoch += 1
        rng = random.Random(wds.utils.make_seed(self.seed, worker_id(), self.epoch))
        return wds.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(src)


class ReportSkips:
    """Attach the number of newly skipped samples to each batch (``batch["skipped"]``), for DataLoader workers."""

    def __init__(self, handler: SkippedSamples) -> None:
        self.handler = handler

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        """Add ``"skipped"`` to every batch."""
        for batch in src:
            batch["skipped"] = self.handler.take_new()
            yield batch


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Expand a brace pattern (``train-{000000..000009}.tar``, ``::``-separated lists) into shard URLs.

    Local files must exist (a clear ``FileNotFoundError`` lists the missing ones); URLs and ``pipe:`` commands are
    checked only when read.
    """
    urls = wds.shardlists.expand_urls(shards) if isinstance(shards, str) else list(shards)
    if not urls:
        raise ValueError(f"no shards in {shards!r}")
    local = [u for u in urls if urlparse(u).scheme in ("", "file")]
    missing = [u for u in local if not Path(urlparse(u).path if u.startswith("file:") else u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shard files do not exist, e.g. {missing[:3]}")
    return urls


class WebDatasetImages(ResumableData):
    """Streams WebDataset shards written by ``data/make_shards.py`` (issue [ud2m], "Data").

    Training reads resampled shards (``resampled=True``: every rank and worker draws shards with replacement from
    its own seeded stream, so any number of shards serves any number of ranks), or splits the shard list across
    ranks (:func:`split_by_rank`: ``wds.split_by_node`` with the rank fixed at setup) and DataLoader workers
    (``wds.split_by_worker``); in that mode :meth:`setup` raises when there are fewer shards than
    ``world_size * max(1, num_workers)``. Validation always splits the shard list (no resampling, no augmentation,
    central crops); when there are fewer validation shards than ranks, every rank reads all of them.

    Train batches are full (the last partial batch of a pass is dropped); validation keeps partial batches. Paired
    samples are neither cropped nor flipped, so ``image_size``/``channels`` must match the stored images.

    Corrupt members (undecodable PNG, bad JSON, missing keys, truncated tar) are skipped with one warning each
    (shard and key) and counted in :attr:`skipped_samples`; a shard that yields fewer samples than its size in the
    ``info.json`` of ``make_shards.py`` (a truncated tar stops at the cut) adds every sample it lost. With
    ``num_workers=0`` the count is exact. With workers the counts live in the worker processes: each batch carries
    the number of new skips in ``batch["skipped"]``, which :meth:`on_before_batch_transfer` removes and adds up, so
    the count is only updated when Lightning drives the loop, and skips after a worker's last batch are not counted.

    Args:
        train_shards: local path, brace pattern or URL (``pipe:``, http) of the training shards.
        val_shards: the same for validation (``None``: no validation loader).
        batch_size: samples per batch and rank.
        num_workers: DataLoader workers per rank (validation: persistent; training: started per epoch, whose streams
            are seeded from the epoch, see :class:`ResumableLoader`).
        image_size: output side; training crops are random, validation crops central.
        channels: 1 or 3.
        random_flip: random horizontal flips for training (off for data with a handedness, e.g. digits).
        rot90: random rotations by multiples of 90° for training (:class:`CropFlip`).
        zoom: random zoom-out range ``(lo, hi)`` of the training crops (:class:`CropFlip`; None: off).
        shuffle_buffer: sample shuffle buffer per worker.
        resampled: resample training shards (see above).
        seed: base seed of shard order, shuffle and crops.
        samples_per_epoch: samples per epoch and rank (``None``: one pass, or an endless stream when resampled;
            then set the Trainer's ``max_steps`` and an integer ``val_check_interval``).
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        *,
        batch_size: int = 4,
        num_workers: int = 0,
        image_size: int = 256,
        channels: int = 3,
        random_flip: bool = True,
        rot90: bool = False,
        zoom: list[float] | None = None,
        shuffle_buffer: int = 256,
        resampled: bool = True,
        seed: int = 0,
        samples_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if samples_per_epoch is not None and samples_per_epoch < batch_size:
            raise ValueError(f"samples_per_epoch ({samples_per_epoch}) must be >= batch_size ({batch_size})")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.image_size, self.channels, self.random_flip = image_size, channels, random_flip
        self.shuffle_buffer, self.resampled, self.seed = shuffle_buffer, resampled, seed
        self.samples_per_epoch = samples_per_epoch
        self.augment = {"rot90": rot90, "zoom": zoom}
        self.handlers = {"train": SkippedSamples(), "val": SkippedSamples()}
        self._reported_skips = 0
        self._urls: dict[str, list[str]] = {}
        self.rank, self.world_size = 0, 1

    @property
    def skipped_samples(self) -> int:
        """Corrupt samples skipped so far on this rank (exact with ``num_workers=0``; see the class docstring)."""
        if self.num_workers == 0:
            return sum(h.count for h in self.handlers.values())
        return self._reported_skips

    def setup(self, stage: str | None = None) -> None:
        """Expand the shard lists and check that non-resampled training shards cover every rank and worker."""
        self._urls["train"] = expand_shards(self.train_shards)
        if self.val_shards is not None:
            self._urls["val"] = expand_shards(self.val_shards)
        self.rank, self.world_size = rank_and_world_size(getattr(self, "trainer", None))
        needed = self.world_size * max(1, self.num_workers)
        if not self.resampled and len(self._urls["train"]) < needed:
            raise ValueError(
                f"{len(self._urls['train'])} training shards cannot be split over world_size={self.world_size} "
                f"x max(1, num_workers={self.num_workers}) = {needed} readers: some readers would get no data "
                f"(webdataset's 'No samples found'). Fix: write at least {needed} shards (make_shards.py "
                "--maxcount smaller), lower num_workers, or use resampled=True."
            )

    def _splitters(self, split: str) -> list:
        if split == "val" and len(self._urls["val"]) < self.world_size:
            logger.warning("fewer validation shards than ranks: every rank reads all %d", len(self._urls["val"]))
            return [wds.split_by_worker]
        return [functools.partial(split_by_rank, rank=self.rank, world_size=self.world_size), wds.split_by_worker]

    def pipeline(self, split: str, epoch: int = 0) -> wds.DataPipeline:
        """The webdataset pipeline of ``split`` (``"train"`` or ``"val"``; training: of ``epoch``) yielding collated
        batches."""
        if not self._urls:
            self.setup()
        train, handler, urls = split == "train", self.handlers[split], self._urls[split]
        # distinct streams per rank (and training epoch); workers are folded in by the stages
        seed = wds.utils.make_seed(self.seed, self.rank, epoch) if train else wds.utils.make_seed(self.seed, self.rank)
        if train and self.resampled:
            stages = [wds.ResampledShards(urls, seed=seed, worker_seed=worker_id, deterministic=True)]
        else:
            stages = [wds.SimpleShardList(urls), *self._splitters(split)]
        stages.append(ReadShards(handler, shard_sizes(urls)))
        if train:
            stages.append(SeededShuffle(self.shuffle_buffer, seed))
        transform = ShardTransform(
            self.image_size, self.channels, train=train, seed=seed, random_flip=self.random_flip, **self.augment
        )
        stages += [
            wds.map(decode_sample, handler=handler.decode_errors),
            wds.map(transform),
            wds.batched(self.batch_size, collation_fn=collate_samples, partial=not train),
        ]
        if self.num_workers > 0:
            stages.append(ReportSkips(handler))
        return wds.DataPipeline(*stages)

    def train_dataloader(self) -> ResumableLoader:
        """Training batches (endless when resampled and ``samples_per_epoch`` is None), resumable exactly: a resumed
        epoch is read again up to the checkpoint's batch (data loading only), so keep ``samples_per_epoch``
        moderate with endless streams."""
        num_batches = None if self.samples_per_epoch is None else self.samples_per_epoch // self.batch_size
        return self.resumable(functools.partial(self._train_epoch, num_batches=num_batches), num_batches)

    def _train_epoch(self, epoch: int, skip: int, *, num_batches: int | None) -> Iterable[dict]:
        loader = wds.WebLoader(self.pipeline("train", epoch), batch_size=None, num_workers=self.num_workers)
        if num_batches is not None:
            loader = loader.with_epoch(num_batches)
        return itertools.islice(loader, skip, None)

    def val_dataloader(self) -> wds.WebLoader | list:
        """Validation batches: one pass over this rank's validation shards, central crops."""
        if self.val_shards is None:
            return []
        return wds.WebLoader(self.pipeline("val"), batch_size=None, **_dataloader_kwargs(self.num_workers))

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Remove ``batch["skipped"]`` (worker skip counts) and add it to :attr:`skipped_samples`; record the
        batch's position (:class:`ResumableData`)."""
        if isinstance(batch, dict) and "skipped" in batch:
            self._reported_skips += int(batch.pop("skipped"))
        return super().on_before_batch_transfer(batch, dataloader_idx)


# ------------------------------------------------------------------------------------------------ small data


class ImageListDataset(Dataset):
    r"""Map-style dataset over in-memory ``(C, H, W)`` images on [-1, 1]; item ``i`` is image ``i % n`` cropped.

    With an ``extra`` pool of ``(images, keys)`` and ``extra_fraction`` f, item i comes from the extra pool when
    :math:`\lfloor (i+1) f\rfloor > \lfloor i f\rfloor` (a fraction f of every run of items, spread evenly), as
    extra image :math:`\lfloor i f\rfloor \bmod n_\text{extra}`, and otherwise as image
    :math:`(i - \lfloor (i+1) f\rfloor) \bmod n`, so each pool is cycled in order.
    """

    def __init__(
        self,
        images: list[torch.Tensor],
        keys: list[str],
        crop: CropFlip,
        length: int | None = None,
        *,
        extra: tuple[list[torch.Tensor], list[str]] | None = None,
        extra_fraction: float = 0.0,
    ):
        self.images, self.keys, self.crop = images, keys, crop
        self.extra = extra if extra is not None and len(extra[0]) and extra_fraction > 0 else None
        self.extra_fraction = float(extra_fraction) if self.extra is not None else 0.0
        self.length = len(images) if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def source(self, i: int) -> tuple[torch.Tensor, str]:
        """The uncropped image and key of item ``i`` (class docstring)."""
        f = self.extra_fraction
        before, through = math.floor(i * f), math.floor((i + 1) * f)
        if through > before:
            images, keys = self.extra
            return images[before % len(images)], keys[before % len(keys)]
        j = (i - through) % len(self.images)
        return self.images[j], self.keys[j]

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        """Item ``i``, or ``(i, seed)`` to crop with a generator of its own (:func:`epoch_order`)."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        image, key = self.source(i)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return {"x": self.crop(image, key, generator), "key": key}


def list_image_files(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive, by suffix: PNG, JPEG, TIFF, BMP, WebP), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_files(folder: str | Path) -> list[str]:
    """The image files under ``folder`` (:func:`list_image_files`), as source strings."""
    return [str(p) for p in list_image_files(folder)]


class ImageFolderImages(ResumableData):
    """Small data: a folder of images or a list of sources (file paths, ``skimage:<name>``), held in memory.

    Images are loaded once at :meth:`setup` (unreadable files are skipped with a warning and counted in
    :attr:`skipped_samples`), converted to ``channels``, upscaled (bicubic, shorter side) when smaller than
    ``image_size``, and split deterministically (:func:`split_train_val`). Training items are random crops with
    random horizontal flips; validation items are central crops.

    Args:
        root: a folder (searched recursively) or a list of sources (files, folders searched recursively,
            ``skimage:<name>``, ``sklearn:<name>``, ``matplotlib:<name>``).
        batch_size: samples per batch and rank.
        num_workers: DataLoader workers.
        image_size: output side.
        channels: 1 or 3.
        random_flip: random horizontal flips for training.
        rot90: random rotations by multiples of 90° for training (:class:`CropFlip`).
        zoom: random zoom-out range ``(lo, hi)`` of the training crops (:class:`CropFlip`; None: off). With a few
            photographs, ``rot90`` and ``zoom: [0.5, 1.0]`` multiply the distinct crops (on the photos problems
            they changed the distilled sampler by 0.0-0.25 dB, docs/training.md).
        val_fraction: fraction of images held out for validation.
        seed: split, shuffle and crop seed.
        samples_per_epoch: training items per epoch (``None``: one per training image); items cycle over images.
        val_sources: an explicit held-out list (sources as in ``root``); when given it replaces the random
            ``val_fraction`` split, and every listed source must be among ``root``'s.
        extra_root: a second pool of training images (sources as in ``root``; never used for validation), e.g.
            unconditional samples of the prior being distilled (``python data/make_prior_samples.py``; on the
            photos problems they did not help, docs/training.md "Few training images").
        extra_fraction: the fraction of training items drawn from ``extra_root`` (spread evenly, 0 <= f <= 1).
    """

    def __init__(
        self,
        root: str | list[str],
        *,
        batch_size: int = 4,
        num_workers: int = 0,
        image_size: int = 256,
        channels: int = 3,
        random_flip: bool = True,
        rot90: bool = False,
        zoom: list[float] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        val_sources: list[str] | None = None,
        extra_root: str | list[str] | None = None,
        extra_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= extra_fraction <= 1.0:
            raise ValueError(f"ImageFolderImages: extra_fraction must lie in [0, 1], got {extra_fraction}")
        self.extra_root, self.extra_fraction = extra_root, float(extra_fraction)
        self.val_sources = None if val_sources is None else [str(v) for v in val_sources]
        self.root, self.batch_size, self.num_workers = root, batch_size, num_workers
        self.image_size, self.channels, self.random_flip = image_size, channels, random_flip
        self.val_fraction, self.seed, self.samples_per_epoch = val_fraction, seed, samples_per_epoch
        self.augment = {"rot90": rot90, "zoom": zoom}
        self.skipped_samples = 0
        self.datasets: dict[str, ImageListDataset] = {}

    def sources(self, root: str | list[str] | None = None) -> list[str]:
        """The sources of ``root`` (default: the configured ``root``) as strings: folder contents, or the given
        list with its folders expanded."""
        root = self.root if root is None else root
        if isinstance(root, str) and root.startswith("digits:"):
            return discover_images(root)  # the built-in digits (digits:all, digits:train, ...)
        if isinstance(root, str | Path) and not str(root).startswith(PHOTO_PREFIXES):
            return _folder_files(root)
        if isinstance(root, str | Path):
            return [str(root)]
        return [f for s in root for f in (_folder_files(s) if Path(str(s)).is_dir() else [str(s)])]

    @property
    def image_channels(self) -> int:
        """Channels of one loaded image (``channels``; a clip module stacks several frames)."""
        return self.channels

    def _load(self, source: str) -> torch.Tensor | None:
        try:
            x = to_channels(load_image(source)[0], self.image_channels, source)  # (C, H, W)
        except (OSError, ValueError) as err:
            logger.warning("skipped unreadable image %s: %s", source, err)
            self.skipped_samples += 1
            return None
        if min(x.shape[-2:]) < self.image_size:
            logger.info("%s: %s smaller than image_size=%d, upscaled", source, tuple(x.shape[-2:]), self.image_size)
            return upscale_to(x, self.image_size)
        return x

    def setup(self, stage: str | None = None) -> None:
        """Load the images and build the train/val datasets."""
        if self.datasets:
            return
        loaded = [(s, x) for s in self.sources() if (x := self._load(s)) is not None]
        if not loaded:
            raise ValueError(f"no readable images in {self.root!r}")
        keys = [source_stem(s) for s, _ in loaded]
        train_idx, val_idx = self._split([s for s, _ in loaded])
        for split, idx in (("train", train_idx), ("val", val_idx)):
            self.datasets[split] = self.make_dataset(split, [loaded[i][1] for i in idx], [keys[i] for i in idx])

    def _extra_pool(self) -> tuple[list[torch.Tensor], list[str]] | None:
        """The loaded ``extra_root`` images and keys (None without one)."""
        if self.extra_root is None or self.extra_fraction == 0:
            return None
        loaded = [(s, x) for s in self.sources(self.extra_root) if (x := self._load(s)) is not None]
        if not loaded:
            raise ValueError(f"no readable images in extra_root {self.extra_root!r}")
        logger.info("extra training pool: %d images from %s, %.0f %% of items", len(loaded), self.extra_root,
                    100 * self.extra_fraction)  # fmt: skip
        return [x for _, x in loaded], [source_stem(s) for s, _ in loaded]

    def make_dataset(self, split: str, images: list[torch.Tensor], keys: list[str]) -> Dataset:
        """The dataset of ``split`` over the loaded images: random crops (training, with the ``extra_root`` pool)
        or central crops."""
        seed = wds.utils.make_seed(self.seed, rank_and_world_size(getattr(self, "trainer", None))[0])
        train = split == "train"
        crop = CropFlip(self.image_size, train=train, seed=seed, random_flip=self.random_flip, **self.augment)
        if not train:
            return ImageListDataset(images, keys, crop)
        return ImageListDataset(
            images, keys, crop, self.samples_per_epoch, extra=self._extra_pool(), extra_fraction=self.extra_fraction
        )

    def _split(self, sources: list[str]) -> tuple[list[int], list[int]]:
        """Train/val indices: the explicit ``val_sources`` when given, else :func:`split_train_val`."""
        if self.val_sources is None:
            return split_train_val(sources, self.val_fraction, self.seed)
        missing = sorted(set(self.val_sources) - set(sources))
        if missing:
            raise ValueError(f"val_sources {missing} are not among the readable sources of root ({sources})")
        val = [i for i, s in enumerate(sources) if s in self.val_sources]
        return [i for i in range(len(sources)) if i not in val], val

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled random crops (full batches only), each a pure function of (seed, epoch, rank, position)."""
        train = self.datasets["train"]
        make_epoch = functools.partial(map_style_epoch, self, train, drop_last=True)
        return self.resumable(make_epoch, map_style_batches(self, len(train), drop_last=True))

    def val_dataloader(self) -> DataLoader | list:
        """Central crops of the held-out images."""
        if len(self.datasets["val"]) == 0:
            return []
        return DataLoader(self.datasets["val"], batch_size=self.batch_size, **_dataloader_kwargs(self.num_workers))


# ------------------------------------------------------------------------------------------------ synthetic


def smooth_images(
    num: int, channels: int, image_size: int, *, cutoff: float = 0.08, generator: list[torch.Generator]
) -> torch.Tensor:
    r"""Smooth random images: Gaussian low-pass filtered white noise, standardised and squashed to (-1, 1).

    :math:`z = \mathcal F^{-1}[\exp(-|f|^2 / (2 f_c^2))\, \mathcal F n]`, :math:`x = \tanh(z / \mathrm{std}(z))`
    per image, with :math:`n \sim \mathcal N(0, I)` drawn from ``generator[i]`` for image ``i`` (so an image does not
    depend on the batch composition, §1.5) and :math:`f` in cycles per pixel.

    Returns:
        ``(num, channels, image_size, image_size)`` float32.
    """
    from ud2m.utils import randn

    n = randn((num, channels, image_size, image_size), generator)  # (N, C, H, W)
    fy = torch.fft.fftfreq(image_size)[:, None]
    fx = torch.fft.rfftfreq(image_size)[None, :]
    G = torch.exp(-(fx**2 + fy**2) / (2 * cutoff**2))  # (H, W//2+1)
    z = torch.fft.irfft2(torch.fft.rfft2(n) * G, s=(image_size, image_size))
    return torch.tanh(z / z.flatten(1).std(1).view(-1, 1, 1, 1))


class SyntheticImages(ResumableData):
    """Smooth random images from a seed (:func:`smooth_images`), any size and channel count: the test DataModule.

    Image ``i`` of split ``s`` (0 train, 1 val) is drawn from a generator seeded with ``make_seed(seed, s, i)``, so
    train and val never share an image and the data do not depend on ``batch_size``.

    Args:
        num_train: training images.
        num_val: validation images.
        batch_size: samples per batch.
        image_size: side.
        channels: channel count.
        cutoff: low-pass cut-off (cycles per pixel).
        seed: base seed.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        num_train: int = 64,
        num_val: int = 8,
        *,
        batch_size: int = 4,
        image_size: int = 32,
        channels: int = 3,
        cutoff: float = 0.08,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num = {"train": num_train, "val": num_val}
        self.batch_size, self.image_size, self.channels = batch_size, image_size, channels
        self.cutoff, self.seed, self.num_workers = cutoff, seed, num_workers
        self.datasets: dict[str, ImageListDataset] = {}

    def make_split(self, split: str) -> ImageListDataset:
        """Generate the images of ``split`` (``"train"`` or ``"val"``)."""
        split_id = ("train", "val").index(split)  # an int: make_seed hashes its arguments, and str hashes vary
        gens = [
            torch.Generator().manual_seed(wds.utils.make_seed(self.seed, split_id, i)) for i in range(self.num[split])
        ]
        if not gens:  # an empty split (e.g. num_val=0): no images, no generators to draw from
            return ImageListDataset([], [], CropFlip(self.image_size, train=False))
        x = smooth_images(self.num[split], self.channels, self.image_size, cutoff=self.cutoff, generator=gens)
        keys = [f"synthetic-{split}-{i:06d}" for i in range(self.num[split])]
        return ImageListDataset(list(x), keys, CropFlip(self.image_size, train=False))

    def setup(self, stage: str | None = None) -> None:
        """Generate both splits (once)."""
        if not self.datasets:
            self.datasets = {split: self.make_split(split) for split in ("train", "val")}

    def train_dataloader(self) -> ResumableLoader:
        """Shuffled per epoch from (seed, epoch), split over ranks (:func:`map_style_epoch`)."""
        train = self.datasets["train"]
        make_epoch = functools.partial(map_style_epoch, self, train, drop_last=False)
        return self.resumable(make_epoch, map_style_batches(self, len(train), drop_last=False))

    def val_dataloader(self) -> DataLoader:
        """In order."""
        return DataLoader(self.datasets["val"], batch_size=self.batch_size, **_dataloader_kwargs(self.num_workers))
