"""The `fgvr` command. Thin on purpose: each command parses its options and calls the module named after
its step. Heavy imports (torch, transformers) happen inside commands so that `fgvr --help` is instant.
"""

from __future__ import annotations

import click

from fgvr import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fgvr")
def cli() -> None:
    """Fine-grained visual recognition that thinks fast and slow.

    \b
    Typical use:
      fgvr demo                                   # the whole system on Fashion-MNIST, CPU only
      fgvr build-kb photos/ --shots 5 --out kb    # knowledge base from a k-shot image folder
      fgvr classify kb query.jpg                  # one JSON line per image
      fgvr evaluate kb test-photos/ --out run     # accuracy, slow-path rate, report
      fgvr memory plan --vlm qwen2.5-vl-7b --budget 18GiB
    """


# --- memory (issue 2) -------------------------------------------------------------------------------


# --- knowledge base (issue 3) -----------------------------------------------------------------------


# --- classify / evaluate (issue 4) ------------------------------------------------------------------


# --- experience library (issue 5) -------------------------------------------------------------------


# --- demo (issue 6) ---------------------------------------------------------------------------------


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
