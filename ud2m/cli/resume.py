"""The run record of ``sample.py`` (``metrics.json`` → ``run``) and the check that lets a re-run resume only a run
with the same settings (issue [api]).

Resuming skips every image whose outputs exist and rewrites ``metrics.json`` with the new run record, so a re-run
into the same folder with any setting that changes the restored images (method and its settings, operator, σ_y,
seed, S, model, checkpoint and its weights' content hash, mode, prompt, dtype, crop, model options) would label the old
rows with the new settings.
:func:`check_resume_compatible` refuses such a run before anything is written, naming each setting with its earlier
and new value. A method's settings are compared as resolved (:meth:`ud2m.methods.Method.settings`): an unset
``num_steps`` and ``num_steps: 100`` agree for DPS, whose default is 100.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

from ud2m.io import read_results

if TYPE_CHECKING:
    from ud2m.cli.restore import Job
    from ud2m.cli.restore_video import VideoJob
    from ud2m.methods import Problem

#: resolved settings compared on the run record (``metrics.json`` → ``run``)
RUN_KEYS = (
    "method",
    "settings",
    "operator",
    "sigma_y",
    "seed",
    "num_samples",
    "model",
    "checkpoint",
    "checkpoint_sha256",
    "simulate",
    "prompt",
    "dtype",
)
#: settings compared on the recorded options (``metrics.json`` → ``run.options``), with their defaults resolved
OPTION_KEYS = ("model_options", "crop")


def run_record(job: Job | VideoJob, problem: Problem) -> dict[str, Any]:
    """The ``run`` entry of ``metrics.json`` (the options are added when it is written); ``problem`` resolves the
    method's settings (:meth:`ud2m.methods.Method.settings`). Image and video jobs share it."""
    o, latent = job.options, getattr(job.prior, "vae", None) is not None
    settings = job.method.settings(problem)
    record = dict(method=job.method.name, settings=_json(settings), operator=job.operator_name, sigma_y=job.sigma_y)
    record.update(seed=o.seed, input=o.input, num_samples=o.num_samples, model=job.run.get("model"))
    record.update(simulate=o.simulate, device=str(job.device))
    record.update(checkpoint=None if o.checkpoint is None else str(o.checkpoint), prompt=o.prompt if latent else None)
    # the export's content, not only its path: re-training into the same folder (the quick start's overwrite: true)
    # must not resume with the earlier weights' images
    if o.checkpoint is not None:
        from ud2m.export import base_model_hash  # lazily: ud2m.export loads the unfolded model and peft

        record.update(checkpoint_sha256=base_model_hash(o.checkpoint))
    else:
        record.update(checkpoint_sha256=None)
    record.update(dtype=str(getattr(job.prior, "dtype", torch.float32)))
    return record


def check_resume_compatible(job: Job | VideoJob) -> None:
    """Refuse to mix outputs of a different run into an existing folder (:data:`RUN_KEYS`, :data:`OPTION_KEYS`).

    Raises:
        ValueError: naming every setting that differs, with its earlier and new value.
    """
    earlier = read_results(job.options.output_dir).get("run", {})
    if not earlier:
        return
    diff = {k: (earlier[k], job.run[k]) for k in RUN_KEYS if k in earlier and not _same(k, earlier[k], job.run[k])}
    # a checkpoint run recorded before its hash was: its weights may differ from the folder's today, so refuse
    if earlier.get("checkpoint") is not None and "checkpoint_sha256" not in earlier:
        diff["checkpoint_sha256"] = ("not recorded", job.run["checkpoint_sha256"])
    old_options, new_options = earlier.get("options") or {}, _json(job.options.record())
    for key in OPTION_KEYS:
        if key in old_options and _applies(job, key):
            old, new = _effective(job, key, old_options[key]), _effective(job, key, new_options[key])
            if old != new:
                diff[key] = (old, new)
    if diff:
        changes = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in diff.items())
        raise ValueError(
            f"{job.options.output_dir} holds results of a different run ({changes}): resuming would label its images "
            "with this run's settings. Choose another --output_dir, or rerun with the earlier settings."
        )


def _same(key: str, earlier: Any, now: Any) -> bool:
    """Whether a recorded run entry equals this run's; a method setting added after the earlier run was recorded
    counts as equal while it is at its default (None), so older result folders stay resumable."""
    now = _json(now)
    if key == "settings" and isinstance(earlier, dict) and isinstance(now, dict):
        now = {k: v for k, v in now.items() if k in earlier or v is not None}
    return earlier == now


def _json(value: Any) -> Any:
    """``value`` as ``metrics.json`` stores it (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def _applies(job: Job | VideoJob, key: str) -> bool:
    """Settings that only some methods or modes read are compared only there."""
    if key == "crop":
        return job.options.simulate
    return job.method.needs_model  # model_options


def _effective(job: Job | VideoJob, key: str, value: Any) -> Any:
    """The value a run used: unset option dicts are empty."""
    return value or {} if key == "model_options" else value
