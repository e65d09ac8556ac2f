"""The `fgvr` command. Thin on purpose: each command parses its options and calls the module named after
its step. Heavy imports (torch, transformers) happen inside commands so that `fgvr --help` is instant.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import TYPE_CHECKING

import click

from fgvr import __version__
from fgvr.defaults import DEFAULTS
from fgvr.errors import FgvrError, debug_enabled, storage_error

if TYPE_CHECKING:
    from pathlib import Path

    from fgvr.backends import BackendOptions, VlmBackend


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (click's test runner swaps it per call)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    """fgvr's messages ("fgvr: ...") on stderr: warnings only with -q, progress notes by default, debug with -v.

    Library code only logs (`logging.getLogger(__name__)`); choosing what is shown is the program's job."""
    logger = logging.getLogger("fgvr")
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("fgvr: %(message)s"))
        logger.addHandler(handler)


class _OneLine(click.ClickException):
    """An fgvr error shown as one line (`Error: ...`) with its family's exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class FgvrGroup(click.Group):
    """The root group: fgvr's own errors (and OS errors of the file system, with the file named) become one
    line and a distinct exit code; anything else is a bug and keeps its traceback. `--debug` / FGVR_DEBUG=1
    keeps the traceback of fgvr's own errors too."""

    def invoke(self, ctx: click.Context):
        import warnings

        def one_line_warning(message, category, filename, lineno, file=None, line=None):
            click.echo(f"warning: {message}", err=True)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                warnings.showwarning = one_line_warning
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except FgvrError as e:
            if debug_enabled():
                raise
            raise _OneLine(str(e), e.exit_code) from None
        except OSError as e:
            mapped = storage_error(e)
            if mapped is None or debug_enabled():
                raise
            raise _OneLine(str(mapped), mapped.exit_code) from None


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    from fgvr.errors import set_debug

    set_debug(value)
    return value


@click.group(cls=FgvrGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fgvr")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show the full traceback of an error (also FGVR_DEBUG=1).")
@click.option("-v", "--verbose", count=True, help="More detail on stderr (debug messages).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnx"]), default=None, envvar="FGVR_RUNTIME",
              help="What runs the image encoders: auto (ONNX Runtime on CPU where the family exports, torch on "
                   "CUDA; the default), torch, or onnx. Also FGVR_RUNTIME.")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="FGVR_THREADS",
              help="Intra-op threads for every runtime in this process (default: the cores available, "
                   "cgroup quota included). Also FGVR_THREADS.")
def cli(verbose: int = 0, quiet: bool = False, runtime: str | None = None, threads: int | None = None) -> None:
    """Fine-grained visual recognition that thinks fast and slow.

    \b
    Typical use:
      fgvr demo                                   # the whole system on Fashion-MNIST, CPU only
      fgvr build-kb photos/ --shots 5 --out kb    # knowledge base from a k-shot image folder
      fgvr classify kb query.jpg                  # one JSON line per image
      fgvr evaluate kb test-photos/ --out run     # accuracy, slow-path rate, report
      fgvr memory plan --vlm qwen2.5-vl-7b --budget 18GiB
    """
    configure_logging(verbose, quiet)
    from fgvr.threads import configure

    if runtime:
        os.environ["FGVR_RUNTIME"] = runtime  # read by every spec this process (and its workers) resolves
    configure(threads)


# --- option types: checked at parse time, so nonsense never reaches a step ----------------------------


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: `nan` passes every comparison of a plain FloatRange."""

    name = "float"

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


class ByteSize(click.ParamType):
    """A memory size such as 18GiB, 18GB, 16e9 or 500MiB: finite, and at least `minimum` bytes."""

    name = "size"

    def __init__(self, minimum: int = 1 << 20) -> None:
        self.minimum = minimum

    def convert(self, value, param, ctx):
        from fgvr.models.footprint import format_bytes, parse_bytes

        if isinstance(value, int):
            return value
        try:
            number = float(str(value).strip().rstrip("bBkKmMgGtTiI ").replace("_", "") or "nan")
        except ValueError:
            number = 0.0  # not a plain number: parse_bytes names the problem
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite size: write e.g. 18GiB, 18GB, 16e9 or 500MiB", param, ctx)
        try:
            n = parse_bytes(value)
        except (ValueError, OverflowError) as e:
            self.fail(str(e), param, ctx)
        if n < self.minimum:
            self.fail(f"{value!r} is {format_bytes(n) if n else f'{n} B'}, below the smallest sensible size "
                      f"({format_bytes(self.minimum)})", param, ctx)
        return n


class ImageSize(click.ParamType):
    """HEIGHTxWIDTH in pixels, both at least 1."""

    name = "HxW"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            h, w = (int(x) for x in str(value).lower().split("x"))
        except ValueError:
            self.fail(f"{value!r}: write HEIGHTxWIDTH, e.g. 1024x1024", param, ctx)
        if h < 1 or w < 1 or h > 1 << 20 or w > 1 << 20:
            self.fail(f"{value!r}: both sides must lie in 1..{1 << 20} pixels", param, ctx)
        return h, w


def _check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """cpu, cuda, cuda:N or auto; a CUDA device must exist in this torch (a CPU-only build has none)."""
    if value is None:
        return value
    d = value.strip().lower()
    if d in ("cpu", "auto"):
        return d
    if d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit()):
        import torch

        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise click.BadParameter(f"{value!r}: {why}; use --device cpu (or auto)", ctx, param)
        n = torch.cuda.device_count()
        if d.startswith("cuda:") and int(d[5:]) >= n:
            raise click.BadParameter(f"{value!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})",
                                     ctx, param)
        return d
    raise click.BadParameter(f"{value!r}: use cpu, cuda, cuda:N or auto", ctx, param)



def _set_image_limit(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    from fgvr.data import DEFAULT_MAX_DECODED_PIXELS, set_max_decoded_pixels

    set_max_decoded_pixels(DEFAULT_MAX_DECODED_PIXELS if value is None else value)


def image_limit_option(f):
    """--max-image-pixels: images larger than this once decoded are refused from their header."""
    return click.option("--max-image-pixels", type=click.IntRange(1), default=None, expose_value=False,
                        callback=_set_image_limit, metavar="N",
                        help="Refuse images over N pixels once decoded (a JPEG is decoded reduced first); "
                             "default 64000000.")(f)


class VlmFamilyName(click.ParamType):
    """--vlm-family: one of the VLM families the package declares. Read when the option is used or its help
    shown, not when fgvr starts (the family modules import torch)."""

    name = "family"

    def get_metavar(self, param, ctx=None) -> str:
        from fgvr.models import families

        return "[" + "|".join(f.name for f in families.by_role("vlm")) + "]"

    def convert(self, value, param, ctx):
        from fgvr.models import families

        try:
            return families.vlm_family(str(value)).name
        except ValueError as e:
            self.fail(str(e), param, ctx)


def vlm_options(f):
    """How the VLM is loaded, shared by every command that takes --vlm: dtype, quantisation, pixel cap, and the
    GPU budget the registry enforces (see `fgvr memory plan` for what fits)."""
    opts = [
        click.option("--vlm-dtype", default=None, help="VLM dtype: bf16, fp16, fp32 (default: bf16 on CUDA, fp32 on CPU)."),
        click.option("--quant", type=click.Choice(["int8", "nf4"]), default=None,
                     help="Quantise the VLM with bitsandbytes (CUDA only)."),
        click.option("--max-visual-tokens", type=click.IntRange(4), default=None,
                     help="Pixel cap per image in the VLM family's visual tokens (Qwen2.5-VL: 28x28 pixels each, "
                          "default 1280)."),
        click.option("--gpu-budget", type=ByteSize(), default=None, metavar="SIZE",
                     help="Memory the registry may use on the GPU, e.g. 18GiB (default: the card's capacity)."),
        click.option("--vlm-model", default=None, metavar="NAME",
                     help="Served --vlm URL: the model to ask (default: the only one the server lists)."),
        click.option("--vlm-family", type=VlmFamilyName(), default=None,
                     help="Served --vlm URL: the VLM family whose grid its images are sized for (default: the "
                          "family whose declaration recognises the served model's id, e.g. a hub id, else the default "
                          "one, with a warning). A local folder says its own."),
        click.option("--vlm-concurrency", type=click.IntRange(1), default=8, show_default=True,
                     help="Served --vlm URL: requests in flight at once (the engine batches them)."),
        click.option("--vlm-timeout", type=FiniteFloat(0, min_open=True), default=120.0, show_default=True,
                     help="Served --vlm URL: seconds one try of one answer may take, connect to last byte "
                          "(a server sending slowly is cut there), before it is retried."),
        click.option("--vlm-retries", type=click.IntRange(0), default=4, show_default=True,
                     help="Served --vlm URL: retries (with backoff) after a 429/5xx/time-out or a reply that "
                          "is not an answer (no choice, no letter, an error member, empty text)."),
        click.option("--vlm-openai-key", is_flag=True, default=False,
                     help="Served --vlm URL: the API key is read from $FGVR_VLM_API_KEY only (never stored, "
                          "sent only to --vlm); with this flag $OPENAI_API_KEY is sent too when "
                          "$FGVR_VLM_API_KEY is unset, and only to an https URL."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def open_vlm(vlm: str | None, device: str, o: dict, cache_dir: "Path | None" = None) -> "VlmBackend | None":
    """--vlm through the one door (`fgvr.backends.get_backend`) with the options above, None without --vlm;
    applies --gpu-budget. A backend that cannot start (no such folder, a server that does not answer) fails
    here, before any work. `cache_dir`: where a served backend keeps its answers so a killed run does not
    ask again."""
    from fgvr.backends import get_backend
    from fgvr.models import registry
    from fgvr.models.footprint import parse_bytes

    if o.get("gpu_budget"):
        registry.set_budget(device if device.startswith("cuda") else "cuda:0", parse_bytes(o["gpu_budget"]))
    if not vlm:
        return None
    return get_backend(vlm, vlm_backend_options({**o, "device": device}, cache_dir))


def vlm_backend_options(o: dict, cache_dir: "Path | None" = None) -> "BackendOptions":
    """The `fgvr.backends.BackendOptions` for --vlm from the options above; the pixel cap in visual tokens
    is turned into pixels by the backend, on its VLM family's grid."""
    from fgvr.backends import BackendOptions

    return BackendOptions(device=o.get("device") or "cpu", dtype=o.get("vlm_dtype"), quantization=o.get("quant"),
                          max_visual_tokens=o.get("max_visual_tokens"), family=o.get("vlm_family"),
                          model=o.get("vlm_model"), concurrency=o.get("vlm_concurrency") or 8,
                          timeout_s=o.get("vlm_timeout") or 120.0,
                          retries=4 if o.get("vlm_retries") is None else o["vlm_retries"], cache_dir=cache_dir,
                          openai_key=bool(o.get("vlm_openai_key")))


# --- memory ---------------------------------------------------------------------------------------


@cli.group()
def memory() -> None:
    """What the models take: plan before loading, report after."""


@memory.command("plan")
@click.option("--vlm", default="qwen2.5-vl-7b", show_default=True,
              help="a known VLM name (`fgvr models` lists them), a local VLM folder, or 'none'.")
@click.option("--encoder", default="clip-vit-b32", show_default=True,
              help="clip-vit-b32/b16/l14, siglip-base, efficientnet-lite0/2, a local folder, or 'none'.")
@click.option("--dtype", default="bf16", show_default=True, help="Compute dtype: bf16, fp16 or fp32.")
@click.option("--encoder-dtype", default=None, help="Encoder dtype, if not --dtype.")
@click.option("--budget", type=ByteSize(), default="18GiB", show_default=True, help="GPU budget: 18GiB, 18GB, 16e9 ...")
@click.option("--max-pixels", type=click.IntRange(1), default=None, help="Pixel cap per image (default 1280 visual tokens).")
@click.option("--max-visual-tokens", type=click.IntRange(4), default=None,
              help="Pixel cap as visual tokens (x 28x28 pixels).")
@click.option("--quant", type=click.Choice(["int8", "nf4"]), default=None, help="Quantise the VLM (bitsandbytes).")
@click.option("--image-size", type=ImageSize(), default="1024x1024", show_default=True,
              help="Reference image HxW for token counts.")
@click.option("--text-tokens", type=click.IntRange(0), default=400, show_default=True, help="Prompt text tokens per query.")
@click.option("--new-tokens", type=click.IntRange(0), default=32, show_default=True, help="Generated tokens per query.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Prompts per VLM forward (System 2 scores queries in batches).")
@click.option("--serve", type=click.Choice(["vllm", "sglang", "both"]), default=None,
              help="Print the serving engine's command line that fits --gpu (System 2 served, see README).")
@click.option("--gpu", type=ByteSize(), default=None, metavar="SIZE",
              help="The GPU the engine runs on, for --serve (default: --budget).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def memory_plan(vlm, encoder, dtype, encoder_dtype, budget, max_pixels, max_visual_tokens, quant, image_size,
                text_tokens, new_tokens, batch, serve, gpu, as_json) -> None:
    """Will the models fit the GPU budget? Sizes from the real architectures on the meta device.

    \b
    Prints each model's weights, the KV cache per 1k tokens, the visual tokens and working memory of
    one System 2 generation at the pixel cap, the total and whether it fits; where it does not, each
    change (encoder off the GPU, lower pixel cap, int8, nf4) evaluated, cheapest first.
    """
    import json as _json

    from fgvr.backends import claimant
    from fgvr.models.plan import make_plan, resolve, vlm_family

    if max_pixels and max_visual_tokens:
        raise click.UsageError("give --max-pixels or --max-visual-tokens, not both")
    served = vlm.lower() != "none" and claimant(vlm).SERVED
    if max_visual_tokens and vlm.lower() != "none" and not served:
        max_pixels = vlm_family(vlm, resolve(vlm)[1]).vlm.pixels_for_tokens(max_visual_tokens)
    elif max_visual_tokens:
        from fgvr.models import families

        max_pixels = families.vlm_declaration().pixels_for_tokens(max_visual_tokens)

    if serve:
        from fgvr.models.serve_plan import make_serve_plan

        plans = [make_serve_plan(e, vlm, gpu or budget, max_pixels=max_pixels,
                                 encoder=None if encoder.lower() == "none" else encoder)
                 for e in (("vllm", "sglang") if serve == "both" else (serve,))]  # errors: one line, exit 5
        click.echo(_json.dumps([p.to_json() for p in plans], indent=2) if as_json
                   else "\n\n".join(p.format() for p in plans))
        return
    if served:
        click.echo(f"System 2 is served by {vlm}: the VLM's memory is the server's (plan it with "
                   "--vlm qwen2.5-vl-7b --serve vllm --gpu SIZE); below, fgvr's own process only.", err=True)
    plan = make_plan(
        None if served or vlm.lower() == "none" else vlm,
        None if encoder.lower() == "none" else encoder,
        dtype, budget, quantization=quant, max_pixels=max_pixels,
        image_size=image_size, text_tokens=text_tokens, new_tokens=new_tokens,
        batch=batch, encoder_dtype=encoder_dtype,
    )
    click.echo(_json.dumps(plan.to_json(), indent=2) if as_json else plan.format())


@memory.command("report")
@click.option("--load", "specs", multiple=True, metavar="SPEC",
              help="Load this model first (efficientnet-lite0, a model folder); repeatable.")
@click.option("--device", default="cpu", show_default=True, callback=_check_device,
              help="Device for --load: cpu, cuda, cuda:N.")
@click.option("--dtype", default=None, help="Dtype for --load (default: the family's).")
@click.option("--budget", "budgets", multiple=True, metavar="DEVICE=SIZE", help="e.g. cuda:0=18GiB; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def memory_report(specs, device, dtype, budgets, as_json) -> None:
    """What this process's registry holds: per model and per device, estimated vs measured bytes.

    A fresh process holds nothing; --load loads models through the registry first, so the report shows
    real measured numbers (and the load time of each).
    """
    import json as _json
    import time

    from fgvr.models import parse_spec, registry

    for b in budgets:
        dev, _, size = b.partition("=")
        if not size:
            raise click.UsageError(f"--budget {b!r}: write DEVICE=SIZE, e.g. cuda:0=18GiB")
        registry.set_budget(dev, ByteSize().convert(size, None, None))
    for text in specs:
        try:
            spec = parse_spec(text, device=device, dtype=dtype)
            t0 = time.perf_counter()
            with registry.use(spec):
                pass
            click.echo(f"loaded {spec.name} in {time.perf_counter() - t0:.2f} s", err=True)
        except ImportError as exc:  # an optional package a family needs
            raise click.ClickException(str(exc)) from None
    rep = registry.report()
    click.echo(_json.dumps(rep.to_json(), indent=2) if as_json else rep.format())


# --- knowledge base -------------------------------------------------------------------------------


@cli.command("build-kb")
@click.argument("data", type=click.Path(exists=True, path_type=str))
@click.option("--shots", "-k", type=click.IntRange(min=1), default=DEFAULTS.shots, show_default=True, help="support images per class")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the k-shot draw")
@click.option("--encoder", default="efficientnet-lite0", show_default=True,
              help="efficientnet-lite0 / efficientnet-lite2, or a local CLIP/SigLIP folder")
@click.option("--vlm", default=None, help="a local VLM folder of any VLM family `fgvr models` lists or a served one's URL (http://HOST:PORT/v1): "
                                         "writes one description per class")
@click.option("--out", "-o", required=True, type=click.Path(path_type=str), help="knowledge-base directory to write")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              callback=_check_device)
@click.option("--augment", default="", help="comma list of augmentations averaged per image: flip,crop")
@click.option("--classes-file", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="folder/label -> class name (JSON object, or `folder<TAB>name` lines)")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="decoding threads (default: up to 4 with CUDA, 1 on CPU)")
@image_limit_option
@vlm_options
def build_kb_cmd(data, shots, seed, encoder, vlm, out, batch_size, device, augment, classes_file, workers,
                 **vlm_opts) -> None:
    """Build a knowledge base from an image folder (DATA/<class>/<image>) or a CSV manifest (path,label).

    Resumable: rerun the same command after an interruption and finished classes are reused.
    """
    from fgvr.knowledge_base import build_knowledge_base
    from fgvr.locks import output_lock

    with output_lock(out, "build-kb"):
        vlm_arg = open_vlm(vlm, device, vlm_opts)
        _, summary = build_knowledge_base(
            data, out, shots=shots, seed=seed, encoder=encoder, vlm=vlm_arg, device=device,
            batch_size=batch_size,
            augment=augment, classes_file=classes_file, workers=workers,
        )
    click.echo(f"knowledge base written to {out}")
    click.echo(summary.format())


@cli.group("kb")
def kb_group() -> None:
    """Inspect a knowledge base and change it in place: add, remove, log, revert."""


@kb_group.command("show")
@click.argument("kb_path", metavar="KB", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--max-classes", type=int, default=50, show_default=True, help="rows of the per-class table")
def kb_show_cmd(kb_path, max_classes) -> None:
    """Print what a knowledge base holds: classes, k, encoder, sizes, statistics, fusion, skipped files,
    descriptions (and experience rules, when the base has them)."""
    from pathlib import Path

    from fgvr.knowledge_base import format_knowledge_base, load_knowledge_base

    kb = load_knowledge_base(kb_path)
    click.echo(format_knowledge_base(kb, max_classes=max_classes))
    # The experience library: rules stored under KB/experience/ are listed by
    # fgvr.rules.describe_rules(kb_path) -> str.
    if (Path(kb_path) / "experience").is_dir():
        from fgvr.rules import describe_rules

        click.echo("")
        click.echo(describe_rules(Path(kb_path)))


@kb_group.command("add")
@click.argument("kb_path", metavar="KB", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=str))
@click.option("--label", required=True, help="the class of the images (an existing class or a new one)")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              callback=_check_device)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None, help="decoding threads")
@click.option("--vlm", default=None, help="the base's VLM (a base with class descriptions needs it for a new class)")
@vlm_options
def kb_add_cmd(kb_path, images, label, device, batch_size, workers, vlm, **vlm_opts) -> None:
    """Add IMAGES (files or folders) to KB as support images of class --label, as a new version.

    Only the new images are encoded; class means, fusion and statistics are refitted as a build would.
    """
    from fgvr.knowledge_base.incremental import add_images

    vlm_arg = open_vlm(vlm, device, vlm_opts)
    summary = add_images(kb_path, images, label, device=device, batch_size=batch_size, workers=workers,
                         vlm=vlm_arg, progress=True)
    click.echo(summary.format())


@kb_group.command("remove")
@click.argument("kb_path", metavar="KB", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--class", "class_name", default=None, help="remove this class and all its support images")
@click.option("--image", default=None, type=click.Path(path_type=str), help="remove this one support image")
def kb_remove_cmd(kb_path, class_name, image) -> None:
    """Remove a class (--class NAME) or one support image (--image PATH) from KB, as a new version."""
    from fgvr.knowledge_base.incremental import remove_from_base

    click.echo(remove_from_base(kb_path, class_name=class_name, image=image).format())


@kb_group.command("log")
@click.argument("kb_path", metavar="KB", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="one JSON object per version")
def kb_log_cmd(kb_path, as_json) -> None:
    """List the versions of KB: number, when, who, the change, size and content digest."""
    import json as _json

    from fgvr.knowledge_base.versions import read_log

    for record in read_log(kb_path):
        click.echo(_json.dumps(record.to_json(), ensure_ascii=False) if as_json else record.format())


@kb_group.command("corrections")
@click.argument("kb_path", metavar="KB", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--state", type=click.Choice(["pending", "accepted", "rejected", "undone"]), default=None,
              help="only corrections in this state")
@click.option("--accept", "accept_id", default=None, metavar="ID", help="accept correction ID (`kb add`: a new version)")
@click.option("--reject", "reject_id", default=None, metavar="ID", help="reject correction ID")
@click.option("--undo", "undo_id", default=None, metavar="ID", help="undo correction ID (an accepted one: a new version)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per correction")
def kb_corrections_cmd(kb_path, state, accept_id, reject_id, undo_id, as_json) -> None:
    """List the corrections made on KB's served page (who, when, the answer replaced, the class named, the
    experience rules an accepted one contradicts), or review one. A running `fgvr serve` keeps serving the
    version it loaded until it is restarted or reviews through its own API."""
    import json as _json

    from fgvr.knowledge_base.corrections import CorrectionQueue, rule_report

    q = CorrectionQueue(kb_path)
    chosen = [(f, i) for f, i in (("accept", accept_id), ("reject", reject_id), ("undo", undo_id)) if i]
    if len(chosen) > 1:
        raise click.UsageError("give one of --accept, --reject or --undo")
    if chosen:
        what, cid = chosen[0]
        c = getattr(q, what)(cid, who=_operator_name())
        click.echo(c.format())
        return
    items = q.list(state)
    for c in items:
        click.echo(_json.dumps(c.to_json(), ensure_ascii=False) if as_json else c.format())
    if not as_json:
        for rule, ids in rule_report(items).items():
            click.echo(f"rule {rule} contradicted by {len(ids)} accepted correction(s): {', '.join(ids)}")
        if not items:
            click.echo(f"no corrections for {kb_path}", err=True)


def _operator_name() -> str:
    from fgvr.knowledge_base.versions import _who

    return _who()


@kb_group.command("revert")
@click.argument("kb_path", metavar="KB", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("version", type=click.IntRange(min=1))
def kb_revert_cmd(kb_path, version) -> None:
    """Make VERSION of KB current again (recorded as a new version; see `fgvr kb log`)."""
    from fgvr.knowledge_base.incremental import revert_base

    click.echo(revert_base(kb_path, version).format())


# --- classify / evaluate --------------------------------------------------------------------------


def _system_options(f):
    """Options shared by `classify` and `evaluate`: which System 2, the trigger, the decision."""
    opts = [
        click.option("--vlm", metavar="SPEC", help="System 2 = this VLM folder of any VLM family `fgvr models` lists (in-process), or the URL "
                                                   "of an OpenAI-compatible server (vLLM, SGLang): http://HOST:PORT/v1."),
        click.option("--reranker", is_flag=True, help="System 2 = the CPU visual re-ranker (no VLM needed)."),
        click.option("--slow-budget", type=FiniteFloat(0, 1), default=None,
                     help="Fraction of images to send slow (default 0.3 unless --threshold); the threshold is "
                          "calibrated on the base's support set, or for evaluate see --calibrate."),
        click.option("--threshold", type=FiniteFloat(0, 1), default=None,
                     help="Trigger threshold on the doubt score in [0,1]."),
        click.option("--top-k", type=click.IntRange(1), default=DEFAULTS.top_k, show_default=True, help="Candidates for System 2."),
        click.option("--weight", type=FiniteFloat(0, 1), default=DEFAULTS.decision_weight, show_default=True,
                     help="System 2's weight in the decision (0: System 1 alone, 1: System 2 alone)."),
        click.option("--encoder", metavar="SPEC", default=None,
                     help="Query encoder (default: the base's own; another one is refused)."),
        click.option("--device", default="cpu", show_default=True, callback=_check_device,
                     help="cpu, cuda, cuda:N or auto."),
        click.option("--rules", "n_rules", type=click.IntRange(0), default=DEFAULTS.rules, show_default=True,
                     help="Experience rules per query (those whose classes meet the candidates)."),
        click.option("--rationale", is_flag=True, help="Ask the VLM for a short rationale too."),
        click.option("--debias", type=click.Choice(["none", "cyclic", "prior"]), default="none", show_default=True,
                     help="Option-order debiasing of System 2 (fgvr.debias): cyclic = every order of the options, "
                          "averaged (k calls per image); prior = a letter prior estimated PriDe-style, then divided out."),
        click.option("--unknown-rate", type=FiniteFloat(0, 1, max_open=True), default=None, metavar="R",
                     help="Open set: answer 'unknown' for images unlike every class; R is the share of known-class "
                          "images you accept being answered unknown (threshold from the base's support set, "
                          "leave-one-out; e.g. 0.05). Off by default. A VLM also gets a 'none of these' option."),
        click.option("--unknown-threshold", type=FiniteFloat(-1, 1), default=None, metavar="T",
                     help="Open set with this threshold on System 1's top-1 fused similarity instead of --unknown-rate."),
        click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True),
    ]
    f = vlm_options(image_limit_option(f))  # innermost: listed after --vlm in --help
    for o in reversed(opts):
        f = o(f)
    return f


def _system_kwargs(kb, o: dict, slow_all: bool = False, cache_dir=None) -> dict:
    """open_system's arguments from the options (Ray's actors open their own systems from the same)."""
    from pathlib import Path

    if o["vlm"] and o["reranker"]:
        raise click.UsageError("choose one System 2: --vlm SPEC or --reranker, not both")
    if o["threshold"] is not None and o["slow_budget"] is not None:
        raise click.UsageError("give --threshold or --slow-budget, not both")
    open_set = o.get("unknown_rate") is not None or o.get("unknown_threshold") is not None
    if o.get("unknown_rate") is not None and o.get("unknown_threshold") is not None:
        raise click.UsageError("give --unknown-rate or --unknown-threshold, not both")
    if o["vlm"]:
        from fgvr.slow_path import LETTERS

        if o["top_k"] + open_set > len(LETTERS):
            raise click.UsageError(f"--top-k {o['top_k']}: a VLM reads at most {len(LETTERS)} lettered options"
                                   + (" (one of them is 'none of these' with --unknown-rate/--unknown-threshold)"
                                      if open_set else ""))

    enc = o["encoder"]
    enc = str(Path(enc).resolve()) if enc and Path(enc).exists() else enc  # actors may run in another folder
    return dict(kb_path=str(Path(kb).resolve()), encoder=enc, vlm=open_vlm(o["vlm"], o["device"], o, cache_dir),
                reranker=o["reranker"], budget=o["slow_budget"],
                threshold=o["threshold"], k=o["top_k"], weight=o["weight"], device=o["device"],
                rationale=o["rationale"], n_rules=o["n_rules"], slow_all=slow_all, debias=o.get("debias"),
                unknown_rate=o.get("unknown_rate"), unknown_threshold=o.get("unknown_threshold"))


def _open_system(kb, o: dict, slow_all: bool = False, cache_dir=None):
    from fgvr.pipeline import open_system

    return open_system(**_system_kwargs(kb, o, slow_all, cache_dir))


def _ray_options(f):
    """--ray and its sizes, shared by `classify` (collections) and `evaluate` (see fgvr.ray_run)."""
    opts = [
        click.option("--ray", "ray_address", metavar="ADDRESS", default=None,
                     help="Run the stages on Ray Data: 'local' starts a cluster on this machine, 'auto' joins "
                          "the running one, or a cluster address."),
        click.option("--ray-workers", type=click.IntRange(1), default=None,
                     help="Encode actors (default: one per CPU of the cluster, or per GPU with --device cuda)."),
        click.option("--ray-slow-workers", type=click.IntRange(1), default=1, show_default=True,
                     help="System 2 actors (each takes a GPU with --device cuda and --vlm)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _need_ray(o: dict) -> None:
    """With --ray, fail before any model loads when Ray is not installed."""
    if o.get("ray_address"):
        from fgvr.ray_run import RayError, require_ray

        try:
            require_ray()
        except RayError as e:
            raise click.ClickException(str(e)) from None


def _engine(o: dict, kwargs: dict, system):
    """None (this process) without --ray; else a RayEngine on the cluster --ray names."""
    if not o.get("ray_address"):
        return None
    from fgvr.ray_run import RayEngine, connect

    connect(o["ray_address"])
    return RayEngine(kwargs, system, workers=o["ray_workers"], slow_workers=o["ray_slow_workers"],
                     batch_size=o["batch_size"])


@cli.command()
@click.argument("kb", type=click.Path(file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Classify the collection IMAGES names (one folder, .csv/.jsonl list of paths, or glob) into "
                   "prediction shards in this folder; resumable.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True,
              help="Shard format with --out.")
@click.option("--shard-size", type=click.IntRange(1), default=256, show_default=True,
              help="Records per shard with --out (a kill loses at most the records not yet in a shard).")
@_system_options
@_ray_options
def classify(kb, images, out, fmt, shard_size, **o) -> None:
    """Classify IMAGES with the knowledge base KB: one JSON line per image on stdout.

    Each line: prediction (class id and name), confidence, the path taken (fast, slow, escalated-unavailable
    when no System 2 is given, error for an unreadable file), candidates with fast/slow/final scores,
    rationale, rules used, timings and every input of the trigger's decision.

    \b
    With --out PRED, IMAGES is one collection: a folder, a .csv / .jsonl list of paths, or a glob
    (quote it). One record per image (path, prediction, confidence, top-k with scores, path taken, error)
    goes to PRED/part-*.jsonl (or .parquet); a rerun resumes. --ray runs it on Ray Data.
    """
    import json
    from pathlib import Path

    from fgvr.io import json_dumps
    from fgvr.pipeline import check_outcome
    from fgvr.records import stamped

    if out is None and o["ray_address"]:  # a usage error first: it holds whether or not Ray is installed
        raise click.UsageError("--ray classifies a collection: give it with --out PRED")
    _need_ray(o)
    if out is None and any(Path(p).is_dir() for p in images):
        raise click.UsageError("IMAGES names a folder: to classify a collection, add --out PRED (prediction shards)")
    if out is not None and len(images) != 1:
        raise click.UsageError(f"--out takes one collection (folder, .csv/.jsonl list or quoted glob), got "
                               f"{len(images)} arguments")
    if out is not None:
        counts = _classify_to_shards(kb, images[0], out, fmt, shard_size, o)
        click.echo(json.dumps(counts))
        check_outcome(counts["paths"], f"in the records under {out}")  # this run's new records
        return
    paths: dict[str, int] = {}
    with _open_system(kb, o) as system:
        for i in range(0, len(images), o["batch_size"]):
            for r in system.classify_paths(images[i:i + o["batch_size"]]):
                click.echo(json_dumps(stamped(r.to_dict())))  # the record schema of every fgvr record
                paths[r.path_taken] = paths.get(r.path_taken, 0) + 1
    check_outcome(paths, "on its line")


def _classify_to_shards(kb: str, source: str, out: str, fmt: str, shard_size: int, o: dict) -> dict:
    """`fgvr classify KB SOURCE --out PRED`: the collection run under PRED's lock; returns its counts."""
    from pathlib import Path

    from fgvr.collection import classify_collection, side_path
    from fgvr.locks import output_lock
    from fgvr.pipeline import open_system

    with output_lock(out, "classify"):
        cache = side_path(out, "vlm-cache") if Path(out).is_dir() else Path(out) / "_vlm-cache"
        kwargs = _system_kwargs(kb, o, cache_dir=cache)
        with open_system(**kwargs) as system:
            return classify_collection(system, source, out, {"kb": str(Path(kb).resolve()),
                                                             "encoder": system.encoder.spec.key},
                                       fmt=fmt, shard_size=shard_size, batch_size=o["batch_size"],
                                       engine=_engine(o, kwargs, system))


@cli.command()
@click.argument("kb", type=click.Path(file_okay=False))
@click.argument("data", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Run folder: results.jsonl (resumable), summary.json, report.md + PNGs.")
@click.option("--limit", type=click.IntRange(0), default=None, help="Evaluate at most N images (a seeded round-robin over classes).")
@click.option("--slow-all", is_flag=True,
              help="Run System 2 on every image (decisions still by the trigger) for the exact budget curve.")
@click.option("--calibrate", type=click.Choice(["run", "support"]), default="run", show_default=True,
              help="Where --slow-budget's threshold comes from: this run's own trigger scores (the budget is "
                   "met on the run; images are encoded first, then decided) or the base's support set.")
@click.option("--classes-file", type=click.Path(dir_okay=False), default=None,
              help="Folder/label -> class name mapping for DATA (see fgvr build-kb).")
@_system_options
@_ray_options
def evaluate(kb, data, out, limit, slow_all, calibrate, classes_file, **o) -> None:
    """Evaluate on the labelled folder or CSV DATA: exact-match accuracy on class ids, per class, confusion,
    slow-path rate, accuracy per path, System 2 calls and tokens, latency, peak memory. Killed runs resume."""
    import json
    from pathlib import Path

    from fgvr.data import read_dataset
    from fgvr.evaluate import headline, run_evaluation
    from fgvr.locks import output_lock
    from fgvr.pipeline import open_system

    _need_ray(o)
    dataset = read_dataset(Path(data), classes_file)
    with output_lock(out, "evaluate"):
        kwargs = _system_kwargs(kb, o, slow_all, cache_dir=Path(out) / "vlm-cache")
        with open_system(**kwargs) as system:
            config = {"kb": str(Path(kb).resolve()), "encoder": system.encoder.spec.key,
                      "data": str(Path(data).resolve()), "limit": limit}
            s = run_evaluation(system, dataset, out, config, limit=limit, batch_size=o["batch_size"],
                               calibrate=calibrate, engine=_engine(o, kwargs, system))
    click.echo(json.dumps(headline(s)))
    click.echo(f"wrote {Path(out) / 'summary.json'} and {Path(out) / 'report.md'}", err=True)


@cli.command()
@click.argument("run_a", type=click.Path(exists=True, file_okay=False))
@click.argument("run_b", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as one JSON object.")
def compare(run_a, run_b, as_json) -> None:
    """Is RUN_B really better (or worse) than RUN_A? Paired accuracy difference over the same images with a
    bootstrap 95% interval, and McNemar's exact test. Runs over different image sets are refused."""
    import json

    from fgvr.compare import compare_runs

    c = compare_runs(run_a, run_b)
    click.echo(json.dumps(c.to_json()) if as_json else c.describe())


# --- experience library ---------------------------------------------------------------------------


@cli.command("build-experience")
@click.argument("kb", type=click.Path(exists=True, file_okay=False))
@click.argument("data", type=click.Path(exists=True))
@click.option("--vlm", metavar="SPEC", required=True,
              help="The VLM of any VLM family `fgvr models` lists that reasons and reflects: a model folder, or a served model's URL (http://HOST:PORT/v1).")
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True,
              help="Passes over the held-out images (stops early when a pass keeps no new rule).")
@click.option("--top-k", type=click.IntRange(1), default=DEFAULTS.top_k, show_default=True, help="Candidates for System 2.")
@click.option("--weight", type=FiniteFloat(0, 1), default=DEFAULTS.decision_weight, show_default=True,
              help="System 2's weight in the decision, as in `fgvr evaluate`.")
@click.option("--rules", "n_rules", type=click.IntRange(0), default=DEFAULTS.rules, show_default=True,
              help="Rules per prompt (those whose classes meet the candidates).")
@click.option("--max-per-class", type=click.IntRange(1), default=None,
              help="Use at most N held-out images per class (each costs VLM calls).")
@click.option("--device", default="cpu", show_default=True, callback=_check_device, help="cpu, cuda, cuda:N or auto.")
@click.option("--classes-file", type=click.Path(dir_okay=False), default=None,
              help="Folder/label -> class name mapping for DATA (see fgvr build-kb).")
@click.option("--fresh", is_flag=True, help="Ignore a previous build's progress (accepted rules are kept).")
@vlm_options
def build_experience_cmd(kb, data, vlm, rounds, top_k, weight, n_rules, max_per_class, device, classes_file, fresh,
                         **vlm_opts) -> None:
    """Learn experience rules for KB from the VLM's mistakes on the labelled images in DATA that did not
    build the base. They are split into three parts: rules are proposed on one, kept only if re-running the
    images of another that they touch does not lower their accuracy and fixes at least one, and the third
    reports the effect out of sample. History in KB/experience/log.jsonl; `fgvr evaluate` leaves the build's
    images out. Killed builds resume."""
    import json
    from pathlib import Path

    from fgvr.data import read_dataset
    from fgvr.experience import build_experience, describe_rules
    from fgvr.locks import output_lock

    with output_lock(Path(kb) / "experience", "build-experience"):
        # one backend for reasoning and reflection; a served one's answers kept with the base
        backend = open_vlm(vlm, device, vlm_opts, Path(kb) / "experience" / "vlm-cache")
        summary = build_experience(kb, read_dataset(Path(data), classes_file), backend, rounds, k=top_k,
                                   weight=weight, n_rules=n_rules, max_per_class=max_per_class,
                                   device=device, fresh=fresh)
    click.echo(json.dumps(summary.to_json()))
    click.echo(describe_rules(kb), err=True)



# --- demo -----------------------------------------------------------------------------------------


@cli.command()
@click.option("--shots", "-k", type=click.IntRange(min=1), default=DEFAULTS.shots, show_default=True,
              help="Support images per class (from the train split).")
@click.option("--test-images", type=click.IntRange(min=1), default=None,
              help="Held-out test images (from the test split)  [default: 500; 100 with --quick]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of both samples.")
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False),
              help="Where the images, knowledge base and run go (reruns reuse them).")
@click.option("--slow-budget", type=FiniteFloat(0, 1), default=DEFAULTS.slow_budget, show_default=True,
              help="Fraction of the test images to send to System 2 (threshold from their trigger scores).")
@click.option("--quick", is_flag=True, help="A smaller test sample, for a first look.")
def demo(shots, test_images, seed, out, slow_budget, quick) -> None:
    """The whole system on real images, CPU only: Fashion-MNIST -> image folder -> k-shot knowledge base
    (EfficientNet-Lite0) -> dual system with the visual re-ranker as System 2 -> accuracy and report."""
    from fgvr import demo as demo_mod

    demo_mod.main(out, shots, test_images, seed, slow_budget, quick)


# --- bench ----------------------------------------------------------------------------------------


def _int_list(ctx, param, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r}: write comma-separated integers, e.g. 1,5,16") from None
    if not out:
        raise click.BadParameter("give at least one value, e.g. 1,5,16")
    return out


def _list_datasets(ctx, param, value) -> None:
    if value and not ctx.resilient_parsing:
        from fgvr.datasets import describe_datasets

        click.echo(describe_datasets())
        ctx.exit()


class _BenchCommand(click.Command):
    """`fgvr bench`: its help names the datasets the package declares (read when help is shown, not at import)."""

    def format_help_text(self, ctx, formatter) -> None:
        from fgvr.datasets import bench_help

        self.help = (self.help or "").replace("{datasets}", bench_help())
        super().format_help_text(ctx, formatter)


def _dataset_list(ctx, param, value: str | None) -> list[tuple[str, str | None]] | None:
    """`a,b:coop,c` -> [(a, None), (b, "coop"), (c, None)]: a dataset may name its own split."""
    if value is None:
        return None
    out = []
    for word in (w.strip() for w in value.split(",")):
        if word:
            name, _, split = word.partition(":")
            out.append((name.strip(), split.strip() or None))
    if not out:
        raise click.BadParameter("give one or more dataset names, e.g. cub-200-2011,stanford-dogs")
    return out


@cli.command(cls=_BenchCommand)
@click.argument("dataset", required=False)
@click.option("--datasets", "datasets_", default=None, callback=_dataset_list, metavar="A,B,...",
              help="Several datasets in one table (a row each and the mean); each under its usual folder name in "
                   "--root; NAME:coop or NAME:official sets one dataset's split.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="The dataset's folder as published, or the folder above it (fashion-mnist: default "
                   "/usr/share/datasets/fashion-mnist).")
@click.option("--split", type=click.Choice(["official", "coop"]), default="official", show_default=True,
              help="The publisher's split, or CoOp's split_zhou_*.json re-split (in the dataset's folder).")
@click.option("--fold", type=click.IntRange(1), default=None,
              help="The fold of a dataset published in folds (DTD, SUN397: 1-10; UCF101: 1-3); default 1.")
@click.option("--shots", default="1,5,16", show_default=True, callback=_int_list, help="k values, comma-separated.")
@click.option("--seeds", default="0,1,2", show_default=True, callback=_int_list, help="Seeds of the k-shot draw.")
@click.option("--encoder", default="efficientnet-lite0", show_default=True, metavar="SPEC",
              help="System 1's encoder: efficientnet-lite0/2, or a local CLIP/SigLIP folder.")
@click.option("--vlm", metavar="SPEC", default=None,
              help="System 2 = this VLM folder of any VLM family `fgvr models` lists or a served one's URL (with a CLIP/SigLIP encoder it also "
                   "writes class descriptions).")
@click.option("--reranker", is_flag=True, help="System 2 = the CPU visual re-ranker.")
@click.option("--slow-budget", type=FiniteFloat(0, 1), default=DEFAULTS.slow_budget, show_default=True,
              help="Fraction of the test images sent to System 2 (threshold from their own trigger scores).")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Evaluate N test images (a seeded round-robin over classes), the same N for every cell.")
@click.option("--top-k", type=click.IntRange(1), default=DEFAULTS.top_k, show_default=True,
              help="Candidates for System 2.")
@click.option("--weight", type=FiniteFloat(0, 1), default=DEFAULTS.decision_weight, show_default=True,
              help="System 2's weight in the decision.")
@click.option("--device", default="cpu", show_default=True, callback=_check_device,
              help="cpu, cuda, cuda:N or auto.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Bench folder: one subfolder per (k, seed), table.md, table.json (reruns resume).")
@click.option("--no-reports", is_flag=True, help="Skip each cell's report.md and plots (the table is written anyway).")
@click.option("--list", "list_", is_flag=True, is_eager=True, expose_value=False, callback=_list_datasets,
              help="List the datasets fgvr reads, where each is published and its layout, and exit.")
@vlm_options
def bench(dataset, datasets_, root, split, fold, shots, seeds, encoder, vlm, reranker, slow_budget, limit, top_k,
          weight, device, batch_size, out, no_reports, **vlm_opts) -> None:
    """A paper's k-shot table on DATASET: for every k and seed, a knowledge base from the train split, the
    dual system on the test split; mean ± 95% interval per method. Resumable. With --datasets A,B,...: one
    table with a row per dataset and the mean, as papers' main tables.

    \b
    DATASET: {datasets}
    (see --list for where each is published, its splits and the layout --root must hold).
    """
    from fgvr.bench import run_bench
    from fgvr.bench_suite import run_suite
    from fgvr.datasets import dataset_info

    if (dataset is None) == (datasets_ is None):
        raise click.UsageError("name one DATASET, or several with --datasets A,B,... (not both)")
    # the VLM options given on this command line, to print in the commands that reproduce the table
    cli_args = [w for k, v in vlm_opts.items() if v is not None and v is not False and _given(k)
                for w in ("--" + k.replace("_", "-"), str(v))[:1 if v is True else 2]]
    wanted = [(dataset, None)] if dataset is not None else datasets_
    for name, _ in wanted:
        info = dataset_info(name)  # fgvr's errors are shown as one line with their exit code by the root group
        if root is None and info.needs_root:
            raise click.UsageError(f"--root DIR is required for {info.name}: the folder you downloaded it to. "
                                   "`fgvr bench --list` shows the expected layout.")
    common = dict(root=root, shots=shots, seeds=seeds, encoder=encoder,
                  vlm=open_vlm(vlm, device, vlm_opts),
                  reranker=reranker, slow_budget=slow_budget, limit=limit, top_k=top_k, weight=weight,
                  device=device, batch_size=batch_size, cli_args=cli_args, reports=not no_reports)
    if dataset is not None:
        table = run_bench(dataset, out, split=split, fold=fold, **common)
    else:
        table = run_suite([(n, s or split) for n, s in datasets_], out, fold=fold, **common)
    click.echo(table.markdown)
    click.echo(f"wrote {out}/table.md and {out}/table.json", err=True)


# --- serve ----------------------------------------------------------------------------------------


def _given(name: str) -> bool:
    """Whether option `name` of the running command was given (not left at its default)."""
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(name) not in (ParameterSource.DEFAULT, None)


@cli.command("serve")
@click.argument("kb", type=click.Path(file_okay=False, exists=True))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything beyond loopback without --token warns loudly.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--token", default=None, envvar="FGVR_TOKEN", show_envvar=True,
              help="Require 'Authorization: Bearer TOKEN' on the API and /metrics.")
@click.option("--admin-token", default=None, envvar="FGVR_ADMIN_TOKEN", show_envvar=True,
              help="The operator's token: review corrections (/v1/corrections list, accept, reject, undo). "
                   "Without it those routes are refused.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Answer requests whose Host header is NAME too (repeatable). On a loopback address only "
                   "localhost, 127.x and [::1] are answered otherwise (DNS-rebinding protection).")
@click.option("--runs", type=click.Path(file_okay=False, exists=True), default=None,
              help="An evaluation run folder (or a folder of them) to browse at /runs.")
@click.option("--max-upload", type=ByteSize(minimum=1024), default="10MiB", show_default=True,
              help="Largest request body (per image in a batch).")
@click.option("--max-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
              help="Largest image (width x height, read from its header before decoding).")
@click.option("--max-batch-images", type=click.IntRange(1), default=16, show_default=True,
              help="Images in one /v1/classify/batch request.")
@click.option("--read-timeout", type=FiniteFloat(0.1), default=30.0, show_default=True,
              help="Seconds a client has to send its request body.")
@click.option("--head-timeout", type=FiniteFloat(0.1), default=10.0, show_default=True,
              help="Seconds a client has to send its request line and headers (a connection that has not is closed).")
@click.option("--encode-wait-ms", type=FiniteFloat(0), default=5.0, show_default=True,
              help="Longest wait for the encoder's micro-batch to fill (--batch-size is its size).")
@click.option("--slow-batch", type=click.IntRange(1), default=4, show_default=True,
              help="Images per System 2 call; one call runs at a time.")
@_system_options
def serve_cmd(kb, host, port, token, admin_token, allowed_hosts, runs, max_upload, max_pixels, max_batch_images, read_timeout,
              head_timeout, encode_wait_ms, slow_batch, **o) -> None:
    """Serve the knowledge base KB: a JSON API (/v1/classify, /v1/classify/batch, /v1/classes, /healthz,
    /metrics) and a page at / that shows the answer and why (fast or slow, System 2's question, support images).

    --batch-size is the encoder's micro-batch, 4 unless given: on CPU a bigger batch did not lower the cost
    per image here, and it raises the server's memory (benchmarks/serve_load.py).
    """
    import os
    from pathlib import Path

    # Before torch starts OpenMP: idle OpenMP workers sleep instead of spinning, so they do not take the CPU
    # from the request threads (decoding, HTTP) of the same process. On a 2-core machine shared with other
    # work, spinning made a Lite0 forward 10-20x slower here. An explicit setting is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from fgvr.models.footprint import parse_bytes
    from fgvr.serve import ServeSettings, serve

    settings = ServeSettings(max_upload_bytes=parse_bytes(max_upload), max_pixels=max_pixels,
                             max_batch_images=max_batch_images, read_timeout_s=read_timeout, head_timeout_s=head_timeout,
                             encode_batch=o["batch_size"] if _given("batch_size") else 4,
                             encode_wait_ms=encode_wait_ms, slow_batch=slow_batch,
                             token=token or None, admin_token=admin_token or None, runs=Path(runs) if runs else None, bind=host,
                             allowed_hosts=tuple(allowed_hosts))
    kwargs = {**_system_kwargs(kb, o), "slow_batch": slow_batch}  # options checked before the server starts

    def opener():
        from fgvr.pipeline import open_system

        return open_system(**kwargs)

    raise SystemExit(serve(opener, host, port, settings))


@cli.command("models")
@click.option("--dir", "models_dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="A models folder (models/): say whether each model's weights are in DIR/NAME.")
@click.option("--family", default=None, help="Only this family (clip, siglip2, dinov2, qwen2_5_vl, ...).")
@click.option("--no-sizes", is_flag=True, help="Skip the sizes (building the largest networks on the meta device takes seconds).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--markdown", is_flag=True, help="Print README.md's model table and download lines.")
def models_cmd(models_dir, family, no_sizes, as_json, markdown) -> None:
    """Every model family and known model name: role, size per dtype, where the weights come from.

    \b
    Sizes are parameters + buffers of the real architecture built on the meta device (fp32, bf16;
    int8/nf4 with bitsandbytes for VLMs, whose loaders quantise). Fetch a model with
    `huggingface-cli download HUB_ID --local-dir models/NAME`; --dir models/ then says which are present.
    """
    import json as _json
    from pathlib import Path

    from fgvr.models import catalog, families

    if family and family not in families.names():
        raise click.BadParameter(f"unknown family {family!r}; known: {', '.join(families.names())}",
                                 param_hint="--family")
    if models_dir and not Path(models_dir).is_dir():
        raise click.BadParameter(f"{models_dir} is not a folder; create it and fetch models into it",
                                 param_hint="--dir")
    table = catalog.rows(Path(models_dir) if models_dir else None, family=family, sizes=not no_sizes)
    if markdown:
        click.echo(catalog.markdown(table))
        return
    click.echo(_json.dumps([r.to_json() for r in table], indent=2) if as_json else catalog.format_rows(table))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
