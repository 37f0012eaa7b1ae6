"""The `infersnap` command: config, status and serve."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
import yaml

from infersnap import __version__
from infersnap.catalog import ModelEntry, scan
from infersnap.cli import engines as engine_views
from infersnap.cli import models as model_views
from infersnap.cli.router import POLICIES as ROUTER_POLICIES
from infersnap.cli.status import NotRunning, query_status
from infersnap.config import Config, ConfigError
from infersnap.engines import EngineChoiceError, manifests
from infersnap.hwdetect import Machine, to_builtins
from infersnap.models import ModelNotFound
from infersnap.status import status_document

FORMATS = click.Choice(["yaml", "json"])
TABLE_FORMATS = click.Choice(["table", "json"])
ROOT = click.option(
    "--root",
    default="/",
    show_default=True,
    type=click.Path(exists=True, file_okay=False),
    help="read the machine from this folder instead (e.g. a recorded machine)",
)


def _load_config() -> Config:
    """The config as is; a damaged file is left to whoever acts on it (see Config)."""
    return Config()


def _config_for_reading(then: str = "showing the defaults in its place") -> Config:
    """The config for a command that only reads it: a damaged file is warned about, not fatal."""
    config = Config()
    if config.problem:
        click.echo(f"infersnap: warning: {config.problem}; {then}; to fix: {config.remedy}", err=True)
    return config


def _emit(document: Any, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(yaml.safe_dump(document, sort_keys=False, default_flow_style=False).rstrip())


def _bare(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


@click.group()
@click.version_option(__version__, prog_name="infersnap")
def main() -> None:
    """infersnap: a local LLM server with an OpenAI-compatible API."""


@main.command()
def serve() -> None:
    """Serve the configured model until stopped (Ctrl-C)."""
    from infersnap.cli.supervisor import ServeError, serve as run_server
    from infersnap.planning import PlanError

    config = _load_config()
    try:
        config.check()
    except ConfigError as exc:
        raise click.ClickException(f"not starting: {exc}") from None
    try:
        sys.exit(run_server(config))
    except (ServeError, PlanError, ModelNotFound, PermissionError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--format", "fmt", type=FORMATS, default="yaml", show_default=True)
def status(fmt: str) -> None:
    """Ask the running server for its API URL, engine, model and workers."""
    _config_for_reading("`infersnap serve` will refuse to start until it is fixed")
    try:
        current = query_status()
    except NotRunning as exc:
        raise click.ClickException(str(exc)) from None
    _emit(status_document(current), fmt)


@main.command()
@click.option("--no-open", is_flag=True, help="only print the URL, even where a desktop could open a browser")
def webui(no_open: bool) -> None:
    """Print the running server's web chat URL; open it in a browser where a desktop exists."""
    try:
        endpoints = query_status().endpoints
    except NotRunning as exc:
        raise click.ClickException(f"{exc}; start it with `infersnap serve`") from None
    url = endpoints.get("webui")
    if url is None:
        raise click.ClickException("this server serves no web chat (webui.enabled is false); "
                                   "`infersnap set webui.enabled=true` and restart it")
    click.echo(url)
    if not no_open and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):  # a terminal alone opens nothing
        import webbrowser

        webbrowser.open(url)


@main.command()
@click.argument("key", required=False, default="")
@click.option("--format", "fmt", type=FORMATS, default="yaml", show_default=True)
def get(key: str, fmt: str) -> None:
    """Print a config key's value, or every key under a prefix (e.g. `http`)."""
    config = _config_for_reading()
    try:
        values = config.values(key)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if key in values and fmt == "yaml":
        click.echo(_bare(values[key]))
    else:
        _emit(values, fmt)


@main.command("set")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
def set_(assignments: tuple[str, ...]) -> None:
    """Set config keys; they apply when the server next starts."""
    parsed: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.ClickException(f"expected KEY=VALUE, got {item!r}")
        parsed[key.strip()] = value
    config = _load_config()
    try:
        config.set_many(parsed)
    except ConfigError as exc:
        raise click.ClickException(f"{exc} (nothing was changed)") from None


@main.command()
@click.argument("keys", nargs=-1, required=True)
def unset(keys: tuple[str, ...]) -> None:
    """Return config keys to their defaults."""
    config = _load_config()
    try:
        config.unset(list(keys))
    except ConfigError as exc:
        raise click.ClickException(f"{exc} (nothing was changed)") from None


@main.command()
@ROOT
@click.option("--format", "fmt", type=FORMATS, default="yaml", show_default=True)
def machine(root: str, fmt: str) -> None:
    """What hardware detection finds: CPU, memory, disk, GPUs, NPUs, PCI devices."""
    _emit(to_builtins(engine_views.detect(root)), fmt)


@main.command()
@ROOT
@click.option("--format", "fmt", type=TABLE_FORMATS, default="table", show_default=True)
def engines(root: str, fmt: str) -> None:
    """Every engine, whether it can run on this machine, and (*) the ones that serve."""
    found = engine_views.detect(root)
    config = _config_for_reading("using the defaults in its place")
    measured, probed = _measured(config, found, root)
    active = engine_views.active_engines(config, found, measured, probed)
    if fmt == "json":
        _emit(engine_views.engines_document(found, active, measured, probed), "json")
    else:
        click.echo(engine_views.format_table(engine_views.engines_table(found, active, measured, probed)))


def _measured(config: Config, machine: Machine, root: str) -> tuple[dict, dict]:
    """The stored profiles and probes to show beside the verdicts: only this machine has any."""
    from infersnap.planning import shown

    return shown(config, machine) if root == "/" else ({}, {})


@main.command()
@click.argument("name", required=False)
@ROOT
@click.option("--format", "fmt", type=FORMATS, default="yaml", show_default=True)
def engine(name: str | None, root: str, fmt: str) -> None:
    """An engine's manifest and its verdict on this machine (the active one when NAME is left out)."""
    found = engine_views.detect(root)
    config = _config_for_reading("using the defaults in its place")
    if name is not None and name not in manifests():
        raise click.ClickException(f"unknown engine {name!r}; known engines: {', '.join(manifests())}")
    measured, probed = _measured(config, found, root)
    active = engine_views.active_engines(config, found, measured, probed)
    if name is None:
        if not active:
            raise click.ClickException("no engine can serve on this machine; see `infersnap engines`")
        documents = [engine_views.engine_document(n, found, active, measured, probed) for n in sorted(active)]
        _emit(documents[0] if len(documents) == 1 else documents, fmt)
        return
    _emit(engine_views.engine_document(name, found, active, measured, probed), fmt)


@main.command("use-engine")
@click.argument("names", nargs=-1)
@click.option("--auto", is_flag=True, help="let infersnap pick the best engine for each device, by measuring them")
@click.option("--no-measure", is_flag=True, help="choose by the static score, without measuring (now and at serve)")
@click.option("--again", is_flag=True, help="with --auto: measure again the engines measured before")
@click.option("--quick", is_flag=True, hidden=True, help="a short measurement (seconds; rough figures), for tests")
@ROOT
def use_engine(names: tuple[str, ...], auto: bool, no_measure: bool, again: bool, quick: bool, root: str) -> None:
    """Choose the engines that serve (one per device, or one per runtime on a device); applies when the
    server next starts. With --auto the engines auto chooses among (each device's best of each runtime)
    are measured once on this machine with the configured model (about a minute each), and their
    profiles stored in the data folder."""
    if bool(names) == auto:
        raise click.UsageError("name one or more engines, or give --auto")
    if (again or quick) and (no_measure or not auto):
        raise click.UsageError("--again and --quick go with --auto, without --no-measure")
    config = _load_config()
    machine = engine_views.detect(root)
    try:
        value = engine_views.use_engines(config, machine, list(names))
        if auto or no_measure:
            config.set_many({"engines-measure": "false" if no_measure else "true"})
    except (EngineChoiceError, ConfigError) as exc:
        raise click.ClickException(f"{exc} (nothing was changed)") from None
    if auto and not no_measure:
        _measure_for_auto(config, machine, root, again, quick)
    click.echo(f"engines: {value} (restart `infersnap serve` to apply)")


def _measure_for_auto(config: Config, machine: Machine, root: str, again: bool, quick: bool) -> None:
    from infersnap import probes
    from infersnap import planning, profiling
    from infersnap.cli.status import NotRunning, query_status

    if root != "/":
        click.echo(f"not measuring: the machine at {root} is not this one", err=True)
        return
    try:
        found = planning.candidates(config, machine)
    except ModelNotFound as exc:
        raise click.ClickException(f"cannot measure the engines: {exc}") from None
    try:
        query_status(timeout=0.5)
        click.echo("infersnap: warning: the server is running; what it serves meanwhile lowers the figures", err=True)
    except NotRunning:
        pass
    say = lambda text: click.echo(text, err=True)  # noqa: E731
    probed = profiling.probe_all(found, machine, config, say=say)  # the settings that run; none that crash
    measured = profiling.measure_missing(profiling.with_options(found, probed), machine, again=again, quick=quick,
                                         say=say)
    for lane, profile in measured.items():
        click.echo(f"{lane.engine} on {lane.device}: {engine_views.summary(profile)}")
    for lane, why in probes.crashed_lanes(probed).items():
        click.echo(f"{lane.engine} on {lane.device}: not measured, it crashes here: {why}")


def _catalog(config: Config) -> list[ModelEntry]:
    """The catalog, its warnings (what it left out) printed."""
    return scan(config, warn=lambda text: click.echo(f"infersnap: warning: {text}", err=True))


@main.group(invoke_without_command=True)
@click.option("--format", "fmt", type=TABLE_FORMATS, default="table", show_default=True)
@click.pass_context
def models(ctx: click.Context, fmt: str) -> None:
    """The models infersnap can serve, (*) the default, and what the running server has loaded."""
    if ctx.invoked_subcommand is not None:
        return
    config = _config_for_reading("using the defaults in its place")
    entries = _catalog(config)
    try:
        served = model_views.server_models(query_status(timeout=1.0))
    except NotRunning:
        served = None
    default = model_views.default_of(config, entries)
    if default is None and config.get("model.default"):
        click.echo(f"infersnap: warning: model.default is {config.get('model.default')!r}, which is not in the "
                   "catalog; `infersnap use-model` one that is", err=True)
    if fmt == "json":
        _emit(model_views.models_document(entries, default, served), "json")
    else:
        click.echo(model_views.format_models(entries, default, served))


@models.command("add")
@click.argument("path", type=click.Path())
@click.option("--name", help="the model's id  [default: the file name without .gguf]")
@click.option("--copy", is_flag=True, help="copy the file instead of linking to it (for a file that will move or go)")
def models_add(path: str, name: str | None, copy: bool) -> None:
    """Add a GGUF file to the models folder: a link to it, or with --copy a copy."""
    entries = _catalog(_config_for_reading("using the defaults in its place"))
    try:
        lines = model_views.add(entries, path, name, copy)
    except model_views.Refused as exc:
        raise click.ClickException(f"{exc} (nothing was changed)") from None
    click.echo("\n".join(lines))


@models.command("remove")
@click.argument("model")
def models_remove(model: str) -> None:
    """Remove a model added with `models add` (its link or copy; never a linked-to file)."""
    config = _config_for_reading("using the defaults in its place")
    try:
        lines = model_views.remove(config, _catalog(config), model)
    except (model_views.Refused, ModelNotFound) as exc:
        raise click.ClickException(f"{exc} (nothing was changed)") from None
    click.echo("\n".join(lines))


@models.command("load")
@click.argument("model")
@click.option("--keep-alive", help="how long it stays loaded once idle: seconds, a duration (5m), -1 for always  "
              "[default: the model's own]")
def models_load(model: str, keep_alive: str | None) -> None:
    """Load MODEL on the running server now (to warm it before it is needed); waits until it is loaded."""
    try:
        click.echo(model_views.control(_config_for_reading(), model, load=True, keep_alive=keep_alive))
    except model_views.Refused as exc:
        raise click.ClickException(str(exc)) from None


@models.command("unload")
@click.argument("model")
def models_unload(model: str) -> None:
    """Unload MODEL on the running server, as soon as no request runs on it."""
    try:
        click.echo(model_views.control(_config_for_reading(), model, load=False))
    except model_views.Refused as exc:
        raise click.ClickException(str(exc)) from None


@main.command("use-model")
@click.argument("model")
def use_model(model: str) -> None:
    """Serve MODEL when a request names none (sets model.default); applies when the server next starts."""
    config = _load_config()
    try:
        click.echo(model_views.use_model(config, _catalog(config), model))
    except (model_views.Refused, ModelNotFound, ConfigError) as exc:
        raise click.ClickException(f"{exc} (nothing was changed)") from None


@main.command()
@click.option("--system", help="a system prompt that opens the conversation (and survives /reset)")
@click.option("--max-tokens", type=click.IntRange(min=1), help="the longest answer, in tokens  [default: the server's]")
@click.option("--temperature", type=click.FloatRange(0, 2), help="0 picks the likeliest token  [default: the server's]")
def chat(system: str | None, max_tokens: int | None, temperature: float | None) -> None:
    """Chat with the running server in the terminal; /reset forgets, /exit leaves."""
    from infersnap.cli.chat import run

    run(_config_for_reading("using the defaults in its place"), system, max_tokens, temperature)


@main.command()
@click.argument("nodes", nargs=-1, required=True)
@click.option("--policy", type=click.Choice(ROUTER_POLICIES),
              default="consistent_hash", show_default=True,
              help="consistent_hash keeps a conversation that sends X-Session-ID on one node; cache_aware places "
                   "by the prompt's beginning (agents that send no header); see docs/cluster.md")
@click.option("--host", default="127.0.0.1", show_default=True, help="the address the router listens on")
@click.option("--port", type=click.IntRange(1, 65535), default=30000, show_default=True)
@click.option("--prometheus-port", type=click.IntRange(1, 65535), default=29000, show_default=True,
              help="the router's own /metrics (one port per router on a host)")
@click.option("--api-key", help="a key of the nodes, sent on the routes the router passes through (messages, responses)")
@click.option("--run", "run_it", is_flag=True, help="start the router instead of printing its command")
def router(nodes: tuple[str, ...], policy: str, host: str, port: int, prometheus_port: int, api_key: str | None,
           run_it: bool) -> None:
    """The vllm-router command for these infersnap nodes (http://HOST:PORT each): print it, or --run it."""
    import shlex

    from infersnap.cli import router as router_command

    argv = router_command.command(list(nodes), policy, host, port, prometheus_port, api_key)
    if run_it:
        try:
            router_command.run(argv)
        except FileNotFoundError:
            raise click.ClickException(f"vllm-router is not installed: pip install vllm-router=={router_command.TESTED_VERSION}")
    click.echo(shlex.join(argv))


class _Levels(click.ParamType):
    name = "LEVELS"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click's signature
        if isinstance(value, list):
            return value
        from infersnap.cli.bench import parse_levels

        try:
            return parse_levels(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@main.command()
@click.option("--url", help="the server's OpenAI base URL, e.g. http://host:8328/v1  [default: this infersnap's]")
@click.option("--model", help="the model to ask for  [default: the first that GET {url}/models lists]")
@click.option("--requests", "requests_", type=click.IntRange(min=1), help="requests per concurrency level  [default: 32, or unlimited with --duration]")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="seconds per level after which no new request starts")
@click.option("--concurrency", "levels", type=_Levels(), default="1,2,4,8", show_default=True, help="comma list of concurrency levels, run in turn")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="approximate prompt length (words)")
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--stream/--no-stream", default=True, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--api-key", default="none", show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True, help="seconds before a request counts as an error")
@click.option("--compare", "compare_url", help="a second server's base URL, loaded with the same requests, level by level")
@click.option("--json", "as_json", is_flag=True, help="print one JSON document instead of tables")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write throughput and latency against concurrency to this PNG")
def bench(
    url: str | None,
    model: str | None,
    requests_: int | None,
    duration: float | None,
    levels: list[int],
    prompt_tokens: int,
    max_tokens: int,
    stream: bool,
    temperature: float,
    api_key: str,
    timeout: float,
    compare_url: str | None,
    as_json: bool,
    plot_path: str | None,
) -> None:
    """Load an OpenAI-compatible server: throughput and latency at each concurrency level."""
    from infersnap.cli import bench as b

    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException("--plot needs matplotlib: pip install matplotlib (or infersnap[plot])") from None
    if url is None:
        try:
            url = query_status().endpoints["openai"]
        except NotRunning as exc:
            raise click.ClickException(f"{exc}; start `infersnap serve` or give --url") from None
    url = url.rstrip("/")
    settings = b.Settings(
        requests=requests_ if requests_ is not None or duration is not None else 32,
        duration=duration,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=stream,
        temperature=temperature,
        api_key=api_key,
        timeout=timeout,
    )
    try:
        targets = [b.Target(url, model or b.first_model(url, api_key))]
        if compare_url:
            compare_url = compare_url.rstrip("/")
            targets.append(b.Target(compare_url, model or b.first_model(compare_url, api_key)))
    except b.BenchError as exc:
        raise click.ClickException(str(exc)) from None

    progress = None
    if not as_json and sys.stderr.isatty():
        finished = 0
        total = f"/{settings.requests * len(levels) * len(targets)}" if settings.requests else ""

        def progress() -> None:
            nonlocal finished
            finished += 1
            click.echo(f"\r{finished}{total} requests", err=True, nl=False)

    runs = b.run_sweep(targets, levels, settings, progress)
    if progress is not None:
        click.echo("\r" + " " * 30 + "\r", err=True, nl=False)
    if plot_path:
        b.plot(runs, plot_path)
    if as_json:
        click.echo(json.dumps(b.json_report(targets, runs, levels, settings), indent=2))
    else:
        click.echo(b.text_report(targets, runs, settings) + (f"\nplot: {plot_path}" if plot_path else ""))
    if all(r.done == 0 for results in runs for r in results):
        raise click.ClickException("every request failed")


if __name__ == "__main__":
    main()
