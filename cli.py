"""``surgery``: the command line, a thin layer over ``surgery.api``.

Each command builds arguments, calls one API function, shows a progress bar through the loop's
callback, and echoes the output path. Only click is imported at start-up (``--help`` < 1 s);
``SurgeryError`` becomes ``Error: <message>`` with exit code 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def writing_options(f):
    """The options every writing verb shares (see ``surgery.run.RunOptions``)."""
    opts = [
        click.option("-o", "--out", type=click.Path(), help="Output folder (written atomically)."),
        click.option("--force", is_flag=True, help="Replace an existing output folder."),
        click.option(
            "--dry-run", is_flag=True, help="Print the plan and estimates; write nothing."
        ),
        click.option(
            "--targets",
            default=None,
            help="Modules: all-linear (default), suffixes q_proj,v_proj, or a regex.",
        ),
        click.option("--exclude", default=None, help="Modules to skip (same syntax)."),
        click.option("--layers", default=None, help="Layer indices, e.g. 0,2,5-7."),
        click.option(
            "--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True
        ),
        click.option("--dtype", default=None, help="Output dtype for computed tensors (bf16…)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--shard-size", default="5GB", show_default=True),
        click.option(
            "--executor",
            type=click.Choice(["serial", "process", "ray"]),
            default="serial",
            show_default=True,
        ),
        click.option("--workers", type=int, default=1, show_default=True),
        click.option("--ray-address", default=None, help="auto or HOST:PORT (default: local)."),
        click.option("--push", default=None, metavar="REPO_ID", help="Push the output to the Hub."),
        click.option(
            "--resume", is_flag=True, help="Continue an interrupted run of the same command."
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def run_verb(fn, *args: Any, quiet: bool = False, **kwargs: Any) -> None:
    """Call an API verb with a progress bar and print the result (a path or a dry-run plan)."""
    from surgery.run import Plan

    bar = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if quiet or not sys.stderr.isatty() and total < 2:
            return
        if bar is None:
            bar = click.progressbar(
                length=total, label=fn.__name__, file=sys.stderr, item_show_func=lambda n: n
            )
            bar.__enter__()
        bar.update(1, name)

    repo = kwargs.pop("push", None)
    if repo and not kwargs.get("dry_run"):
        from surgery.hub import check_push

        check_push(repo)  # no token / offline: fail before the compute, not after it
    try:
        result = fn(*args, progress=progress, **kwargs)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if isinstance(result, Plan):
        click.echo(result.render())
    else:
        click.echo(f"wrote {result}")
        if repo:  # pushed here rather than in the loop, so that the commit URL is printed
            from surgery.hub import push

            click.echo(push(result, repo))


class SurgeryGroup(click.Group):
    """A click group that turns ``SurgeryError`` into ``Error: <message>`` and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from surgery.errors import SurgeryError

        try:
            return super().invoke(ctx)
        except SurgeryError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=SurgeryGroup, context_settings=CONTEXT)
@click.version_option(package_name="ckpt-surgery", prog_name="surgery")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def cli(verbose: int) -> None:
    """Model surgery on safetensors checkpoints: decompose, extract, merge, port, edit, push."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command(context_settings=CONTEXT)
@click.argument("src")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--spectra", is_flag=True, help="Add per-matrix singular-value figures.")
@click.option("--targets", default="all-linear", show_default=True, help="Matrices for --spectra.")
def inspect(src: str, as_json: bool, spectra: bool, targets: str) -> None:
    """Show tensors, shapes, dtypes and shards of SRC (headers only unless --spectra)."""
    from surgery import api

    info = api.inspect(src, spectra_of=targets if spectra else None)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(api.format_inspect(info))


@cli.command(context_settings=CONTEXT)
@click.option("--kind", type=click.Choice(["merge", "decompose", "edit"]), default=None)
@click.option("--json", "as_json", is_flag=True)
def methods(kind: str | None, as_json: bool) -> None:
    """List the registered methods with their parameters, defaults and papers."""
    from surgery.methods import describe

    rows = describe(kind)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        click.echo(f"{r['name']:<16} {r['kind']:<10} {r['summary']}")
        params = ", ".join(f"{k}={v!r}" for k, v in r["params"].items())
        click.echo(f"{'':<27} params: {params or '(none)'}")
        click.echo(f"{'':<27} {r['reference']}")


@cli.command(context_settings=CONTEXT)
@click.argument("src")
@click.option("-m", "--method", default="probe", show_default=True, help="probe or project_out.")
@click.option("--probe", required=True, help="safetensors file holding 'probe' [hidden].")
@click.option("-p", "--param", "params", multiple=True, help="key=value method parameter.")
@writing_options
def edit(src, method, probe, params, quiet, **common):
    """Edit weights with a behaviour probe (Model Surgery) and write the edited model."""
    from surgery.edit import edit as api_fn

    run_verb(api_fn, src, method=method, probe=probe, params=list(params), quiet=quiet, **common)


@cli.command(context_settings=CONTEXT)
@click.argument("src")
@click.option("--data", required=True, help="Labelled JSONL: text/messages/input_ids + label.")
@click.option("-o", "--out", required=True, help="The probe .safetensors file to write.")
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--samples", type=int, default=None, help="Use the first N lines.")
@click.option("--seq-len", type=int, default=None, help="Truncate samples to L tokens.")
@click.option("--label-key", default="label", show_default=True)
@click.option("--tokenizer", default=None, help="Tokenizer folder (default: SRC).")
@click.option("--config", default=None, help="config.json when SRC has none.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--force", is_flag=True, help="Replace an existing file.")
def probe(src, data, out, **kw):
    """Train a behaviour probe on mean-pooled final hidden states (extra: calib)."""
    from surgery.probe import probe_accuracy, train_probe

    path = train_probe(src, data, out=out, **kw)
    click.echo(f"wrote {path} (train accuracy {probe_accuracy(path):.3f})")


@cli.command(context_settings=CONTEXT)
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, help="Branch to commit to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--commit-message", default=None, help="Default: what surgery.json says was done.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
def push(folder, repo_id, private, revision, create_pr, commit_message, token) -> None:
    """Upload FOLDER to the Hub repo REPO_ID in one commit and print the commit URL."""
    from surgery.hub import push as hub_push

    opts = dict(private=private, revision=revision, create_pr=create_pr)
    click.echo(hub_push(folder, repo_id, token=token, commit_message=commit_message, **opts))


@cli.command(context_settings=CONTEXT)
@click.argument("base")
@click.argument("adapter")
@writing_options
def apply(base, adapter, quiet, **common):
    """Fold a PEFT adapter ADAPTER into BASE (fp32) and write the merged model."""
    from surgery.lifecycle import apply as api_fn

    run_verb(api_fn, base, adapter, quiet=quiet, **common)


@cli.command(context_settings=CONTEXT)
@click.argument("adapter")
@click.option("--to", "to", required=True, help="The new (evolved) base.")
@click.option("--from", "from_", default=None, help="The old base: drift report; required "
              "when ADAPTER is a full fine-tuned checkpoint.")  # fmt: skip
@click.option("--merge", "merge_", is_flag=True, help="Write NEW + ΔW instead of an adapter.")
@click.option("-r", "--rank", type=int, default=None, help="Full fine-tune input: patch rank.")
@click.option("--energy", type=float, default=None, help="Full fine-tune input: energy kept.")
@writing_options
def port(adapter, to, from_, merge_, rank, energy, quiet, **common):
    """Port a LoRA ADAPTER (or a full fine-tune) to an evolved base (PortLLM, training-free)."""
    from surgery.lifecycle import drift_table
    from surgery.lifecycle import port as api_fn

    run_verb(api_fn, adapter, to=to, from_=from_, merge=merge_, rank=rank, energy=energy,
             quiet=quiet, **common)  # fmt: skip
    if from_ and not common.get("dry_run"):
        click.echo(drift_table(common["out"]))


@cli.command(context_settings=CONTEXT)
@click.argument("adapter")
@click.option("--init", default=None, help="The initial adapter of a PiSSA/CorDA/OLoRA run.")
@click.option("--base", default=None, help="KaSA: the original base (folds the truncation).")
@click.option("--pad-rank", is_flag=True, help="Zero-pad ranks to the next vLLM rank.")
@writing_options
def convert(adapter, init, base, pad_rank, quiet, **common):
    """Convert ADAPTER (PiSSA/CorDA with --init, KaSA, AdaLoRA) to a plain servable LoRA."""
    from surgery.lifecycle import convert as api_fn

    run_verb(api_fn, adapter, init=init, base=base, pad_rank=pad_rank, quiet=quiet, **common)


def main() -> None:
    """Console entry point (``surgery``)."""
    cli(prog_name="surgery")


if __name__ == "__main__":
    main()
