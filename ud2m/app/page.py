"""The restoration web page (issue [app]): ``ud2m-app`` / ``python -m ud2m app`` serves a Gradio page that runs
``sample.py``'s job on the shipped priors (docs/app.md). Only the layout and the event wiring live here; what a run
does and what the page shows are the pure functions of :mod:`ud2m.app.jobs`.

Gradio is the convention of this field's demos (diffusers', DPS's and DiffPIR's Spaces), keeps the whole page in
Python and gives uploads, image editors, progress bars and downloads as components. It is an optional extra
(``pip install -e ".[app]"``) and is imported only here, when the page is built.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from ud2m.app import jobs
from ud2m.app.jobs import KINDS, METHODS, VIDEO_METHODS, Form

logger = logging.getLogger(__name__)
INSTALL_HINT = 'the restoration page needs Gradio: pip install -e ".[app]"'


def import_gradio():
    """``gradio``, offline (no analytics, no hub) and with a clear error naming the extra when it is missing."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return gr


def theme(gr):
    """The default theme with system fonts: no font download, so the page also loads offline."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


# ---------------------------------------------------------------------------------------------- form
def _input_column(gr, choices: dict[str, jobs.PriorChoice]) -> dict[str, Any]:
    digits = choices["digits"]
    return dict(
        prior=gr.Radio(
            [(c.label or name, name) for name, c in choices.items()],
            value="digits",
            label="prior (shipped, no download)",
            elem_id="prior",
        ),
        input_kind=gr.Radio(["built-in", "upload"], value="built-in", label="input"),
        builtin=gr.Dropdown(
            list(digits.builtins), value=digits.builtins[0][1], label="built-in image", elem_id="builtin"
        ),
        upload=gr.File(
            label="upload an image (a clip for the video prior: mp4, gif)",
            file_count="single",
            type="filepath",
            elem_id="upload",
        ),
        crop=gr.Number(digits.size, precision=0, label="centre crop of a simulated input (0: whole image)"),
        observation=gr.Checkbox(False, label="the upload is already the observation y (of the operator below)"),
    )


def _degradation_column(gr, choices: dict[str, jobs.PriorChoice]) -> dict[str, Any]:
    presets = choices["digits"].presets
    return dict(
        degradation=gr.Dropdown(
            [*presets, *KINDS],
            value=presets[0],
            label="degradation: a preset (its own parameters) or a kind (the parameters below)",
        ),
        factor=gr.Slider(2, 8, value=4, step=1, label="SR factor"),
        blur_sigma=gr.Slider(0.3, 5.0, value=round(3**0.5, 3), step=0.01, label="blur σ (pixels)"),
        p_obs=gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="random inpainting: share observed"),
        box=gr.Slider(0.1, 0.9, value=0.5, step=0.05, label="box inpainting: side / image side"),
        sigma_y=gr.Number(0.05, label="noise σ_y (on [0, 1])"),
        mask=gr.ImageEditor(
            label="drawn mask: paint the pixels to fill", type="numpy", image_mode="RGBA", sources=(), visible=False
        ),
    )


def _method_column(gr) -> dict[str, Any]:
    steps, weight = jobs.method_defaults("digits", "ud2m/mnist_sr_x4", "LATINO")
    return dict(
        method=gr.Radio(list(METHODS), value="LATINO", label="method", elem_id="method"),
        steps=gr.Number(steps, precision=0, label="steps (0: the method's own)"),
        weight=gr.Number(
            weight,
            label="weight: LATINO γ (0: preset rule) · DiffPIR λ · DPS ζ · TV λ · video: time scale (0: 1)",
            elem_id="weight",
        ),
        export=gr.Dropdown([], value=None, label="UD2M export", allow_custom_value=True, visible=False),
        num_samples=gr.Slider(1, 16, value=1, step=1, label="S posterior samples", elem_id="num_samples"),
        seed=gr.Number(0, precision=0, label="seed"),
    )


# ---------------------------------------------------------------------------------------------- events
def _defaults(prior: str, degradation: str, method: str) -> tuple[int, float]:
    """The form's steps and weight for a choice (weight 0: LATINO's preset rule, the field's convention)."""
    steps, weight = jobs.method_defaults(prior, degradation, method)
    return steps, 0.0 if weight is None else weight


def form_of(values: dict[str, Any]) -> Form:
    """The :class:`~ud2m.app.jobs.Form` of the page's values (the mask editor's layers become a bool mask)."""
    values = dict(values)
    values["mask"] = jobs.painted(values.get("mask"))
    values["weight"] = values.get("weight") or None
    return Form(**values)


def run_page(root: Path, values: dict[str, Any]) -> tuple:
    """Run the form; a bad input gives a message in the status box and empty outputs, never a broken page.
    Returns the four images, the three videos, the metrics, the status and the zip."""
    form = form_of(values)
    try:
        result = jobs.run_form(form, root)
    except Exception as err:  # the page must survive anything a run raises; the message says what it was
        if not isinstance(err, jobs.USER_ERRORS):
            logger.exception("run failed")
        return (None,) * (len(_IMAGES) + len(_VIDEOS)) + ("", jobs.error_message(err), None)
    status = f"Done: `{result.folder}` (the same files as `sample.py`)."
    if isinstance(result, jobs.VideoResult):
        images, videos = (None,) * len(_IMAGES), tuple(_str(p) for p in (result.y, result.restored, result.truth))
        if result.truth is not None:
            status = f"Done: `{result.folder}` (the same files as `sample.py`, plus the truth's video)."
    else:
        images, videos = (result.y, result.restored, result.std, result.truth), (None,) * len(_VIDEOS)
        if form.num_samples == 1:
            status += " One sample: no std map (set S > 1)."
    return (*images, *videos, jobs.metrics_markdown(result, form), status, str(result.archive))


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _on_prior(gr, choices, prior: str, method: str):
    """A prior's inputs, presets (a video prior: its presets only), methods and defaults; which outputs show."""
    choice = choices[prior]
    degradation = choice.presets[0]
    methods = VIDEO_METHODS if choice.video else METHODS
    method = method if method in methods else methods[0]
    steps, weight = _defaults(prior, degradation, method)
    return (
        gr.update(choices=list(choice.builtins), value=choice.builtins[0][1]),
        gr.update(choices=[*choice.presets, *(() if choice.video else KINDS)], value=degradation),
        choice.size,
        gr.update(choices=list(methods), value=method),
        steps,
        weight,
        1 if choice.video else gr.update(),  # one restoration per video
        gr.update(visible=not choice.video),
        gr.update(visible=choice.video),
    )


def _on_degradation(gr, prior: str, degradation: str, method: str):
    steps, weight = _defaults(prior, degradation, method)
    sigma = jobs.preset_sigma_y(degradation)
    return gr.update() if sigma is None else sigma, gr.update(visible=degradation == "drawn mask"), steps, weight


def _on_method(gr, prior: str, degradation: str, method: str):
    steps, weight = _defaults(prior, degradation, method)
    return steps, weight, gr.update(visible=method == "UD2M")


def _find_exports(gr, folder: str):
    try:
        found = jobs.find_exports(folder)
    except FileNotFoundError as err:
        return gr.update(choices=[], value=None), f"**Cannot search:** {err}"
    message = f"{len(found)} export(s) in `{folder}`" if found else f"no export (ud2m.json) in `{folder}`"
    return gr.update(choices=found, value=found[0] if found else None), message


def _mask_canvas(gr, values: dict[str, Any]):
    if values["degradation"] != "drawn mask":
        return gr.update()
    image = jobs.preview(form_of({**values, "mask": None}))
    return None if image is None else {"background": image, "layers": [], "composite": image}


# ---------------------------------------------------------------------------------------------- page
def build_page(root: str | Path = "outputs/app"):
    """The page as a ``gradio.Blocks``; each run writes a fresh folder under ``root`` (and a zip of it)."""
    gr = import_gradio()
    root, choices = Path(root), jobs.priors()
    with gr.Blocks(title="ud2m restoration") as page:
        gr.Markdown(
            "# ud2m: restore an image or a clip\nThe same job as `sample.py`, on the shipped priors (no download). "
            "Pick an input, a degradation and a method, then **Restore**."
        )
        with gr.Row():
            with gr.Column():
                form = _input_column(gr, choices)
            with gr.Column():
                form |= _degradation_column(gr, choices)
            with gr.Column():
                form |= _method_column(gr)
                with gr.Row(visible=False) as export_row:
                    folder = gr.Textbox(label="folder with UD2M exports", scale=3)
                    find = gr.Button("Find exports", scale=1)
                run = gr.Button("Restore", variant="primary", elem_id="run")
        status = gr.Markdown("", elem_id="status")
        with gr.Row() as image_row:
            shown = [gr.Image(label=label, elem_id=i, interactive=False) for label, i in _IMAGES]
        with gr.Row(visible=False) as video_row:
            shown += [
                gr.Video(label=label, elem_id=i, interactive=False, autoplay=True, loop=True) for label, i in _VIDEOS
            ]
        with gr.Row():
            metrics = gr.Markdown("", elem_id="metrics")
            download = gr.File(label="download the run (zip)", elem_id="download")
        outputs = (shown, metrics, status, download, (image_row, video_row))
        _wire(gr, form, choices, root, run, outputs, (export_row, folder, find))
    return page


_IMAGES = (
    ("observation y", "y"),
    ("restoration (posterior mean)", "restored"),
    ("pixelwise std (heat map)", "std"),
    ("truth", "truth"),
)
_VIDEOS = (
    ("observation y (video)", "y_video"),
    ("restoration (video)", "restored_video"),
    ("truth (video)", "truth_video"),
)


def _wire(gr, form, choices, root, run, outputs, export) -> None:
    shown, metrics, status, download, rows = outputs
    export_row, folder, find = export
    names = list(form)

    def on_run(values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (gradio's progress idiom)
        progress(0, desc="loading the prior")
        return run_page(root, {name: values[form[name]] for name in names})

    run.click(on_run, inputs=set(form.values()), outputs=[*shown, metrics, status, download])
    pick = [form["prior"], form["degradation"], form["method"]]
    on_prior = [form[k] for k in ("builtin", "degradation", "crop", "method", "steps", "weight", "num_samples")]
    form["prior"].change(lambda p, m: _on_prior(gr, choices, p, m), [form["prior"], form["method"]], [*on_prior, *rows])
    form["degradation"].change(
        lambda *v: _on_degradation(gr, *v), pick, [form["sigma_y"], form["mask"], form["steps"], form["weight"]]
    )
    form["method"].change(lambda *v: _on_method(gr, *v), pick, [form["steps"], form["weight"], export_row])
    form["method"].change(lambda m: gr.update(visible=m == "UD2M"), form["method"], form["export"])
    find.click(lambda f: _find_exports(gr, f), folder, [form["export"], status])
    form["upload"].upload(lambda: "upload", None, form["input_kind"])
    form["upload"].clear(lambda: "built-in", None, form["input_kind"])
    canvas_fields = [n for n in names if n != "mask"]
    # The crop listens to the user's edits only: a prior change sets it in the same update as the built-in list,
    # and its change event would send the old built-in value against the new choices (gradio's "not in the list").
    canvas_events = [form[k].change for k in ("degradation", "builtin", "upload", "input_kind", "observation")]
    for event in [*canvas_events, form["crop"].input]:
        event(
            lambda values: _mask_canvas(gr, {n: values[form[n]] for n in canvas_fields}),
            set(form[n] for n in canvas_fields),
            form["mask"],
        )


# ---------------------------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """``ud2m-app [--host H] [--port P] [--output_root DIR]``: serve the page (local only, no share link)."""
    parser = argparse.ArgumentParser(prog="ud2m-app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--output_root", default="outputs/app", help="each run writes a fresh folder here")
    args = parser.parse_args(argv)
    try:
        gr = import_gradio()
    except ImportError as err:
        raise SystemExit(f"ud2m-app: error: {err}") from None
    page = build_page(args.output_root)
    Path(args.output_root).mkdir(parents=True, exist_ok=True)
    page.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        theme=theme(gr),
        allowed_paths=[str(Path(args.output_root).resolve())],
    )


__all__ = ["build_page", "form_of", "import_gradio", "main", "run_page"]
