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
            type=click.Choice(["serial", "thread", "process", "ray"]),
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
        if bar is not None and (done == 1 or total != bar.length):  # a new pass: a new bar
            bar.__exit__(None, None, None)
            bar = None
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


def _plotter(path: str | None, common: dict[str, Any]):
    """For ``--plot``: check matplotlib now, return a callable that maps OUT's surgery.json."""

    def plot() -> None:
        if path and not common.get("dry_run"):
            from surgery.plot import plot_report

            click.echo(f"wrote {plot_report(common['out'], path)}")

    if path:
        from surgery.plot import require

        require()  # fail before the run, not after it
    return plot


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
@click.option("--plot", type=click.Path(), help="Write a spectra PNG (implies --spectra).")
def inspect(src: str, as_json: bool, spectra: bool, targets: str, plot: str | None) -> None:
    """Show tensors, shapes, dtypes and shards of SRC (headers only unless --spectra)."""
    from surgery import api

    if plot:
        from surgery.plot import require

        require()  # the install hint before any SVD
    info = api.inspect(src, spectra_of=targets if spectra or plot else None)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(api.format_inspect(info))
    if plot:
        from surgery.plot import plot_spectra

        click.echo(f"wrote {plot_spectra(info, plot)}", err=as_json)


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
@click.argument("models", nargs=-1)
@click.option("--base", default=None, help="The base checkpoint (task vectors are model − base).")
@click.option("-m", "--method", default=None, help="ties, dare_ties, dare_linear, pcb, …")
@click.option("-w", "--weight", "weights", type=float, multiple=True, help="One per model (1).")
@click.option("-p", "--param", "params", multiple=True, help="key=value method parameter.")
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="A mergekit YAML.")
@click.option("-r", "--rank", type=int, default=None, help="Adapter merges: output rank.")
@writing_options
def merge(models, base, method, weights, params, config, rank, quiet, **common):
    """Merge fine-tunes MODEL... of one --base (TIES, DARE, PCB, task arithmetic).

    When every MODEL is a PEFT adapter of one base, the merge runs per module in delta space and
    writes one adapter, re-factored to rank -r (default: the sum of the input ranks)."""
    from surgery.merge import merge as api_fn

    if rank is not None:
        common["rank"] = rank
    run_verb(api_fn, list(models), base=base, method=method, weights=list(weights) or None,
             params=list(params), config=config, quiet=quiet, **common)  # fmt: skip


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
@click.option("--plot", type=click.Path(), help="Write the per-module drift map (PNG).")
@writing_options
def port(adapter, to, from_, merge_, rank, energy, plot, quiet, **common):
    """Port a LoRA ADAPTER (or a full fine-tune) to an evolved base (PortLLM, training-free)."""
    from surgery.lifecycle import drift_table
    from surgery.lifecycle import port as api_fn

    plot_report = _plotter(plot, common)
    run_verb(api_fn, adapter, to=to, from_=from_, merge=merge_, rank=rank, energy=energy,
             quiet=quiet, **common)  # fmt: skip
    if from_ and not common.get("dry_run"):
        click.echo(drift_table(common["out"]))
    plot_report()


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


def calib_options(f):
    """Calibration options shared by ``surgery calibrate`` and ``decompose --calib``."""
    opts = [
        click.option(
            "--calib",
            type=click.Path(dir_okay=False),
            default=None,
            help="Calibration JSONL: text, messages, prompt+completion or input_ids lines.",
        ),
        click.option(
            "--calib-samples",
            "samples",
            type=int,
            default=None,
            help="Use the first N samples (default: all).",
        ),
        click.option("--seq-len", type=int, default=None, help="Truncate samples to L tokens."),
        click.option(
            "--batch-size",
            type=int,
            default=4,
            show_default=True,
            help="Samples per forward (pads are masked: same result as 1).",
        ),
        click.option("--max-tokens", type=int, default=None, help="Stop after T tokens in all."),
        click.option(
            "--cov-norm",
            type=click.Choice(["max", "none"]),
            default="max",
            show_default=True,
            help="max: per-sample |max| normalisation (official/PEFT); none: per token.",
        ),
        click.option(
            "--cov-dtype", type=click.Choice(["fp32", "fp64"]), default="fp32", show_default=True
        ),
        click.option(
            "--max-memory",
            default=None,
            help="Memory for covariances, e.g. 24GB (default: 80% of free).",
        ),
        click.option("--tokenizer", default=None, help="Tokenizer folder (default: SRC)."),
        click.option("--config", "config", default=None, help="config.json when SRC has none."),
        click.option("--no-cache", is_flag=True, help="Recompute even if cached stats match."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def calib_progress(quiet: bool):
    """A progress bar showing samples/s and tokens/s; returns ``(callback, close)``."""
    state: dict[str, Any] = {"bar": None, "group": 0}

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
            state["bar"] = None

    def progress(p) -> None:
        if quiet or not sys.stderr.isatty():  # no bar in logs; -v logs the rates per pass
            return
        if state["bar"] is None or p.group != state["group"]:
            close()
            label = "calibrate" + (f" {p.group}/{p.groups}" if p.groups > 1 else "")
            state["bar"] = click.progressbar(
                length=p.total_samples,
                label=label,
                file=sys.stderr,
                show_pos=True,
                item_show_func=lambda s: s,
            )
            state["bar"].__enter__()
            state["group"] = p.group
        bar = state["bar"]
        rate = f"{p.samples_per_s:.1f} samples/s, {p.tokens_per_s:.0f} tokens/s"
        bar.update(p.samples - bar.pos, rate)
        if p.group == p.groups and p.samples >= p.total_samples:
            close()  # calibration done: the next bar (decompose) starts on a clean line

    return progress, close


@cli.command(context_settings=CONTEXT)
@click.argument("src")
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Stats .safetensors to write (default: a file in the cache).",
)
@click.option(
    "--targets", default=None, help="Modules: all-linear (default), suffixes, or a regex."
)
@click.option("--exclude", default=None, help="Modules to skip (same syntax).")
@click.option("--layers", default=None, help="Layer indices, e.g. 0,2,5-7.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@calib_options
@click.option("--dry-run", is_flag=True, help="Print the plan and the memory estimate only.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def calibrate(src, out, calib, no_cache, dry_run, quiet, **kw):
    """Per-module input covariances from a JSONL file, for CorDA (extra: calib)."""
    from surgery.calibrate import calibrate as api_fn
    from surgery.calibrate import plan_calibration

    if not calib:
        raise click.UsageError("--calib FILE.jsonl is required")
    plan = plan_calibration(src, calib, **kw)
    if dry_run:
        click.echo("\n".join(plan.describe()))
        return
    progress, close = calib_progress(quiet)
    try:
        path = api_fn(
            src, calib, out=out, plan=plan, progress=progress, cache_dir=False if no_cache else None
        )
    finally:
        close()
    click.echo(f"wrote {path}")


@cli.command(context_settings=CONTEXT)
@click.argument("src")
@click.option("-m", "--method", required=True, help="pissa, corda, kasa (surgery methods).")
@click.option("-r", "--rank", type=int, required=True, help="Adapter rank.")
@click.option("--alpha", type=float, default=None, help="lora_alpha (default: the rank).")
@click.option("-p", "--param", "params", multiple=True, help="key=value method parameter.")
@click.option("--stats", default=None, help="Stats safetensors with <module>.cov (CorDA).")
@calib_options
@writing_options
def decompose(src, method, rank, alpha, params, stats, calib, quiet, **common):
    """Split SRC into a residual model (OUT) and a PEFT adapter (OUT/adapter)."""
    from surgery.decompose import decompose as api_fn

    keys = ("samples", "seq_len", "batch_size", "max_tokens", "cov_norm", "cov_dtype",
            "max_memory", "tokenizer", "config", "no_cache")  # fmt: skip
    ckw = {k: common.pop(k) for k in keys}
    progress, close = calib_progress(quiet)  # --calib: OUT.stats.safetensors, then CorDA
    try:
        run_verb(api_fn, src, method=method, rank=rank, alpha=alpha, params=list(params),
                 stats=stats, calib=calib, calib_options=dict(ckw, progress=progress),
                 quiet=quiet, **common)  # fmt: skip
    finally:
        close()


@cli.command(context_settings=CONTEXT)
@click.argument("base")
@click.argument("tuned")
@click.option("-r", "--rank", type=int, default=None, help="Fixed rank per module.")
@click.option("--energy", type=float, default=None, help="Per-module energy kept, in (0, 1].")
@click.option("--budget", type=int, default=None, help="Global budget shared across modules.")
@click.option("--budget-unit", type=click.Choice(["rank", "params"]), default="rank",
              show_default=True)  # fmt: skip
@click.option("--normalize", is_flag=True, help="Budget by relative error per module.")
@click.option("--min-rank", type=int, default=0, show_default=True)
@click.option("--max-rank", type=int, default=None)
@click.option("--include-embeddings", is_flag=True, help="Also embeddings and lm_head.")
@click.option("-p", "--param", "params", multiple=True, help="key=value (niter=0: exact SVD).")
@click.option("--plot", type=click.Path(), help="Write the per-module error map (PNG).")
@writing_options
def extract(base, tuned, params, plot, quiet, **common):
    """Extract a PEFT LoRA adapter of TUNED − BASE into OUT."""
    from surgery.decompose import extract as api_fn

    plot_report = _plotter(plot, common)
    run_verb(api_fn, base, tuned, params=list(params), quiet=quiet, **common)
    plot_report()


@cli.command(context_settings=CONTEXT)
@click.option("-o", "--out", type=click.Path(), default="demo-out", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("-q", "--quiet", is_flag=True)
def demo(out: str, force: bool, quiet: bool) -> None:
    """Run the main job on an embedded tiny model: calibrate + CorDA decompose (no download)."""
    from surgery.demo import run_demo

    r = run_demo(out, force=force)
    click.echo(f"built a tiny Llama checkpoint:  {r['model']}")
    click.echo(f"and a calibration JSONL:        {r['calib']}")
    click.echo(
        f"ran: surgery decompose {r['model']} --calib {r['calib']} -m corda -r {r['rank']} "
        f"-o {r['output']}"
    )
    click.echo(
        f"residual model: {r['output']}   PEFT adapter: {r['adapter']} "
        f"({r['modules']} modules, rank {r['rank']})"
    )
    click.echo(
        f"check: residual + adapter == original weights, max relative error "
        f"{r['max_rel_error']:.2e}   ({r['seconds']} s)"
    )


def main() -> None:
    """Console entry point (``surgery``)."""
    cli(prog_name="surgery")


if __name__ == "__main__":
    main()
