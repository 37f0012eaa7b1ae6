"""The catalog of models and the CLI commands that change it without a server: `models`, `models add`,
`models remove`, `use-model`, the per-model keys and `models.dirs`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import cli, data_env, second_model
from infersnap import catalog
from infersnap.cli import models as model_views
from infersnap.config import SLUG_FORM, Config, ConfigError
from infersnap.models import ModelNotFound, default_model_path

DEFAULT = default_model_path()
DEFAULT_ID = DEFAULT.name.removesuffix(".gguf")  # SmolLM2-135M-Instruct.Q4_1
DEFAULT_SLUG = "smollm2-135m-instruct-q4-1"


def another_file(folder: Path, name: str) -> Path:
    """A second GGUF file for the catalog at no cost: a hard link to the default model (the catalog
    tells files apart by path, links followed, so a symbolic link would be the default model again)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    try:
        os.link(DEFAULT, path)
    except OSError:  # another file system
        shutil.copyfile(DEFAULT, path)
    return path


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return data_env(tmp_path / "data")


def listed(env: dict[str, str]) -> dict[str, dict]:
    return {m["id"]: m for m in json.loads(cli(env, "models", "--format", "json").stdout)}


def state_of(data: Path) -> tuple:
    """What a refused command must leave as it was: config.json and the models folder."""
    config = data / "config.json"
    folder = data / "models"
    files = sorted((p.name, os.readlink(p) if p.is_symlink() else p.stat().st_size) for p in folder.iterdir()) \
        if folder.exists() else None
    return (config.read_bytes() if config.exists() else None), files


def test_the_default_model_is_listed_with_its_details(env):
    [shown] = json.loads(cli(env, "models", "--format", "json").stdout)
    assert shown == {
        "id": DEFAULT_ID, "slug": DEFAULT_SLUG, "path": str(DEFAULT), "source": "default",
        "size_bytes": DEFAULT.stat().st_size, "architecture": "llama", "quantization": "Q4_1",
        "trained_context": 8192, "chat_template": True, "runtimes": ["llamacpp", "openvino"], "problem": "",
        "default": True, "state": "not serving",
    }
    table = cli(env, "models").stdout.splitlines()
    assert table[0].split() == ["model", "slug", "size", "arch", "quant", "trained", "template", "runtimes", "source",
                                "state", "file"]
    assert table[1].split()[:2] == [f"{DEFAULT_ID}*", DEFAULT_SLUG] and "not serving" in table[1]
    assert "llamacpp,openvino" in table[1] and table[1].endswith(str(DEFAULT))


def test_add_links_by_default_and_copies_with_copy(tmp_path, env):
    source = another_file(tmp_path / "mine", "tiny-chat.gguf")
    added = cli(env, "models", "add", str(source))
    link = tmp_path / "data" / "models" / "tiny-chat.gguf"
    assert link.is_symlink() and link.readlink() == source
    assert "linked" in added.stdout and "--copy" in added.stdout and "within seconds" in added.stdout

    copied = cli(env, "models", "add", str(source), "--name", "My_Model.v2", "--copy")
    copy = tmp_path / "data" / "models" / "My_Model.v2.gguf"
    assert copy.is_file() and not copy.is_symlink() and copy.stat().st_size == DEFAULT.stat().st_size
    assert not os.path.samefile(copy, source)
    assert "copied" in copied.stdout and "model-settings.my-model-v2." in copied.stdout

    shown = listed(env)
    assert list(shown) == [DEFAULT_ID, "My_Model.v2", "tiny-chat"]  # each folder in name order, ignoring case
    assert shown["tiny-chat"]["slug"] == "tiny-chat" and shown["tiny-chat"]["path"] == str(link)
    assert shown["My_Model.v2"]["slug"] == "my-model-v2" and shown["My_Model.v2"]["source"] == "models folder"
    assert shown["My_Model.v2"]["runtimes"] == ["llamacpp", "openvino"] and not shown["My_Model.v2"]["default"]
    assert [m["id"] for m in shown.values() if m["default"]] == [DEFAULT_ID]


def test_bad_adds_change_nothing_and_say_why(tmp_path, env):
    data = tmp_path / "data"
    cli(env, "models", "add", str(another_file(tmp_path, "first.gguf")))
    other = another_file(tmp_path, "other.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    before = state_of(data)
    for args, words in [
        ([str(tmp_path / "missing.gguf")], "no such file"),
        ([str(text)], "not a GGUF file"),
        ([str(tmp_path)], "a folder"),
        ([str(other), "--name", "FIRST"], "is taken by first"),  # ids match ignoring case
        ([str(other), "--name", DEFAULT_ID.lower()], f"is taken by {DEFAULT_ID}"),
        ([str(other), "--name", "SmolLM2 135M Instruct Q4 1"], f"has the slug ({DEFAULT_SLUG})"),
        ([str(other), "--name", ""], "empty"),
        ([str(other), "--name", ".hidden"], "starts with a dot"),
        ([str(other), "--name", "a/b"], "slash"),
        ([str(other), "--name", "___"], "no letter or digit"),
        ([str(DEFAULT)], "in the catalog already"),  # the same file, by another link
    ]:
        refused = cli(env, "models", "add", *args, check=False)
        assert refused.returncode != 0 and words in refused.stderr, (args, refused.stderr)
        assert "nothing was changed" in refused.stderr and "Traceback" not in refused.stderr
        assert state_of(data) == before, f"models add {args} changed something"


def test_remove_takes_only_the_link_or_copy(tmp_path, env):
    source = another_file(tmp_path, "linked.gguf")
    cli(env, "models", "add", str(source))
    cli(env, "models", "add", str(source), "--name", "copied", "--copy")
    removed = cli(env, "models", "remove", "LINKED")  # ids match ignoring case
    assert "that file is kept" in removed.stdout and "stops serving it" in removed.stdout
    assert source.is_file() and not (tmp_path / "data" / "models" / "linked.gguf").exists()
    cli(env, "models", "remove", "copied")
    assert list(listed(env)) == [DEFAULT_ID] and source.is_file()


def test_remove_refuses_what_is_not_the_models_folders_and_says_where_to_change_it(tmp_path, env):
    data = tmp_path / "data"
    elsewhere = another_file(tmp_path / "dir", "in-dirs.gguf")
    configured = another_file(tmp_path, "configured.gguf")
    cli(env, "set", f"models.dirs={elsewhere.parent}", f"model.path={configured}", "model.name=chosen")
    cli(env, "models", "add", str(another_file(tmp_path, "kept.gguf")))
    cli(env, "use-model", "kept")
    before = state_of(data)
    for name, words in [
        ("nope", f"unknown model 'nope'; known models: chosen, {DEFAULT_ID}, kept, in-dirs"),
        (DEFAULT_ID, "packaged default model"),
        ("chosen", "unset model.path"),
        ("in-dirs", "models.dirs"),
        ("kept", "it is model.default; `infersnap use-model` another first"),
    ]:
        refused = cli(env, "models", "remove", name, check=False)
        assert refused.returncode != 0 and words in refused.stderr, (name, refused.stderr)
        assert "nothing was changed" in refused.stderr and state_of(data) == before
    assert elsewhere.is_file() and configured.is_file()


def test_use_model_sets_the_default_from_the_catalog(tmp_path, env):
    data = tmp_path / "data"
    cli(env, "models", "add", str(another_file(tmp_path, "Second.gguf")))
    used = cli(env, "use-model", "second")  # by id, ignoring case: the id as the catalog has it is stored
    assert "after a restart" in used.stdout
    assert cli(env, "get", "model.default").stdout.strip() == "Second"
    assert [m["id"] for m in listed(env).values() if m["default"]] == ["Second"]
    assert "Second*" in cli(env, "models").stdout
    cli(env, "use-model", DEFAULT_SLUG)  # by slug
    assert cli(env, "get", "model.default").stdout.strip() == DEFAULT_ID

    (data / "models" / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 10)  # a header cut short
    before = state_of(data)
    for name, words in [("nope", f"known models: {DEFAULT_ID}, broken, Second"), ("broken", "cannot be served")]:
        refused = cli(env, "use-model", name, check=False)
        assert refused.returncode != 0 and words in refused.stderr, refused.stderr
        assert state_of(data) == before
    assert "cannot serve" in cli(env, "models").stdout

    cli(env, "models", "remove", "broken")
    cli(env, "use-model", "second")
    (data / "models" / "Second.gguf").unlink()  # gone behind infersnap's back
    shown = cli(env, "models")
    assert "model.default is 'Second', which is not in the catalog" in shown.stderr
    assert f"{DEFAULT_ID}*" not in shown.stdout  # no model is marked the default


def test_per_model_keys_take_the_global_keys_checks(tmp_path, env):
    data = tmp_path / "data"
    cli(env, "set", f"model-settings.{DEFAULT_SLUG}.context=4096", f"model-settings.{DEFAULT_SLUG}.slots=2",
        "model-settings.not-added-yet.engines=cpu")  # a model added later may be configured first
    assert cli(env, "get", f"model-settings.{DEFAULT_SLUG}.context").stdout.strip() == "4096"
    assert cli(env, "get", f"model-settings.{DEFAULT_SLUG}.keep-alive").stdout.strip() == "300"  # the default
    assert yaml.safe_load(cli(env, "get", "model-settings").stdout) == {
        f"model-settings.{DEFAULT_SLUG}.context": 4096, f"model-settings.{DEFAULT_SLUG}.slots": 2,
        "model-settings.not-added-yet.engines": "cpu",
    }
    assert json.loads(cli(env, "get", "--format", "json").stdout)[f"model-settings.{DEFAULT_SLUG}.slots"] == 2
    assert cli(env, "get", "model-settings.another", "--format", "json").stdout.strip() == "{}"

    before = state_of(data)
    form = "model-settings.<slug>.<setting>"
    for assignment, words in [
        (f"model-settings.{DEFAULT_SLUG}.context=5", f"model-settings.{DEFAULT_SLUG}.context: must be between"),
        (f"model-settings.{DEFAULT_SLUG}.slots=many", "expected a whole number"),
        (f"model-settings.{DEFAULT_SLUG}.engines=no-such-engine", "engines"),
        (f"model-settings.{DEFAULT_SLUG}.keep-alive=-2", "must be between -1"),
        (f"model-settings.{DEFAULT_SLUG}.threads=2", form),  # not a per-model setting
        (f"model-settings.{DEFAULT_ID}.context=4096", form),  # the id, not its slug
        ("model-settings.context=4096", form),
        ("model-settings.-x.context=4096", form),
    ]:
        refused = cli(env, "set", assignment, check=False)
        assert refused.returncode != 0 and words in refused.stderr, (assignment, refused.stderr)
        assert "nothing was changed" in refused.stderr and state_of(data) == before
    refused = cli(env, "get", "model-settings.Bad.context", check=False)
    assert refused.returncode != 0 and form in refused.stderr

    # a bad value in the file is found on reading, as for any key
    stored = json.loads((data / "config.json").read_text())
    (data / "config.json").write_text(json.dumps({**stored, f"model-settings.{DEFAULT_SLUG}.slots": 0}))
    shown = cli(env, "get", f"model-settings.{DEFAULT_SLUG}.slots")
    assert shown.stdout.strip() == "8" and f"model-settings.{DEFAULT_SLUG}.slots" in shown.stderr
    cli(env, "unset", f"model-settings.{DEFAULT_SLUG}.slots")  # which repairs it


def test_new_keys_are_checked(env):
    for assignment, words in [
        ("models.dirs=relative/folder", "absolute path"),
        ("models.keep-alive=-2", "between -1"),
        ("models.max-loaded=0", "between 1 and 64"),
        ("models.memory-budget=-1", "between 0"),
    ]:
        refused = cli(env, "set", assignment, check=False)
        assert refused.returncode != 0 and words in refused.stderr, refused.stderr
    cli(env, "set", "models.keep-alive=-1", "models.max-loaded=2", "models.memory-budget=4096", "models.dirs=~/gguf")
    assert yaml.safe_load(cli(env, "get", "models").stdout) == {
        "models.dirs": "~/gguf", "models.keep-alive": -1, "models.max-loaded": 2, "models.memory-budget": 4096,
    }


def test_models_dirs_are_scanned_after_the_models_folder(tmp_path, env):
    one, two = tmp_path / "one", tmp_path / "two"
    another_file(one, "from-one.gguf")
    another_file(two, "from-two.gguf")
    another_file(two, "added.gguf")  # its id is taken by the models folder's, which comes first
    (two / "readme.txt").write_text("not a model")
    cli(env, "models", "add", str(another_file(tmp_path, "added.gguf")))
    cli(env, "set", f"models.dirs={one}, {two},{tmp_path / 'gone'}")
    shown = cli(env, "models", "--format", "json")
    entries = {m["id"]: m for m in json.loads(shown.stdout)}
    assert list(entries) == [DEFAULT_ID, "added", "from-one", "from-two"]
    assert entries["added"]["source"] == "models folder" and entries["from-two"]["source"] == "models.dirs"
    assert entries["from-one"]["path"] == str(one / "from-one.gguf")
    assert f"{two / 'added.gguf'} (models.dirs) is left out" in shown.stderr
    assert f"{tmp_path / 'gone'} is not a folder" in shown.stderr


def test_gemma3_runs_on_llamacpp_only_and_has_no_chat_template(tmp_path, env):
    cli(env, "models", "add", str(second_model()), "--name", "gemma3")
    gemma = listed(env)["gemma3"]
    assert gemma["architecture"] == "gemma3" and gemma["quantization"] == "Q4_K_M"
    assert gemma["trained_context"] == 32768 and gemma["runtimes"] == ["llamacpp"]
    assert gemma["chat_template"] is False  # this GGUF carries none
    template = tmp_path / "gemma.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    cli(env, "set", f"model-settings.gemma3.chat-template={template}")
    assert listed(env)["gemma3"]["chat_template"] is True


# --- the catalog as code calls it ----------------------------------------------------------------


def test_slugs_are_config_key_segments():
    for model_id, expected in [
        ("SmolLM2-135M-Instruct.Q4_1", "smollm2-135m-instruct-q4-1"),
        ("My_Model.v2", "my-model-v2"),
        ("--Qwen3  0.6B--", "qwen3-0-6b"),
        ("7b-chat", "m-7b-chat"),
        ("Ünïcode", "n-code"),
        ("___", "m"),
    ]:
        assert catalog.slug(model_id) == expected and SLUG_FORM.fullmatch(expected), model_id


def test_the_per_model_view_and_find(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERSNAP_DATA", str(tmp_path))
    config = Config(tmp_path / "config.json")
    template = tmp_path / "t.jinja"
    config.set_many({"worker.slots": "4", "worker.context": "2048", f"model-settings.{DEFAULT_SLUG}.context": "4096",
                     f"model-settings.{DEFAULT_SLUG}.chat-template": str(template)})
    entries = catalog.scan(config)
    entry = catalog.find(entries, DEFAULT_SLUG)
    assert catalog.find(entries, DEFAULT_ID.upper()) == entry == catalog.default_entry(config, entries)
    with pytest.raises(ModelNotFound, match=f"unknown model 'nope'; known models: {DEFAULT_ID}"):
        catalog.find(entries, "nope")

    view = catalog.model_config(config, entry)
    assert view.get("model.path") == str(DEFAULT) and view.get("model.name") == DEFAULT_ID
    assert view.get("worker.context") == 4096 and "worker.context" in view.user  # its own setting
    assert view.get("worker.slots") == 4 and view.get("engines") == "auto"  # the global ones
    assert "worker.slots" in view.user and "engines" not in view.user
    assert view.get(f"model-settings.{DEFAULT_SLUG}.chat-template") == str(template)
    assert config.get("worker.context") == 2048  # the config itself is untouched
    with pytest.raises(ConfigError, match="read-only"):
        view.set_many({"worker.slots": "2"})


def test_the_state_comes_from_the_servers_models(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERSNAP_DATA", str(tmp_path))
    [entry] = catalog.scan(Config(tmp_path / "config.json"))
    assert model_views.state(entry, model_views.server_models(None)) == ("not serving", "")
    before_issue_14 = SimpleNamespace(workers=[])  # a Status without `models`
    assert model_views.state(entry, model_views.server_models(before_issue_14)) == ("unloaded", "")
    failed = SimpleNamespace(models=[SimpleNamespace(name=DEFAULT_ID.lower(), state="failed", error="out of memory")])
    assert model_views.state(entry, model_views.server_models(failed)) == ("failed", "out of memory")


def test_a_model_file_still_being_copied_is_served_once_it_holds_still_and_one_gone_is_left_out(
        tmp_path, monkeypatch, capsys):
    """What a running serve does at each look at the models folders (cli/supervisor.py, replan)."""
    from infersnap.cli.engines import detect
    from infersnap.planning import build_plan, replan

    monkeypatch.setenv("INFERSNAP_DATA", str(tmp_path / "data"))
    config = Config()
    config.set_many({"engines": "cpu", "engines-measure": "false", "worker.embeddings": "false"})
    machine = detect("/")
    folder = tmp_path / "data" / "models"
    folder.mkdir(parents=True)
    (folder / "dangling.gguf").symlink_to(tmp_path / "deleted.gguf")  # `models add` linked a file since deleted
    plan = build_plan(config, machine)  # serves, without it
    assert [m.name for m in plan.models] == [DEFAULT_ID]
    assert "dangling is left out" in capsys.readouterr().err
    marks = [catalog.signature(config)]

    def look(plan):
        marks.append(catalog.signature(config))
        return replan(plan, config, machine, {path for path, *_ in set(marks[-1]) & set(marks[-2])})

    late = folder / "late.gguf"
    late.write_bytes(DEFAULT.read_bytes()[:200_000])  # a copy under way: not even its header is whole
    plan, waits = look(plan)
    assert waits and [m.name for m in plan.models] == [DEFAULT_ID]
    shutil.copyfile(DEFAULT, late)  # the copy ends: it changed since the last look
    plan, waits = look(plan)
    assert waits and [m.name for m in plan.models] == [DEFAULT_ID]
    kept = plan
    plan, waits = look(plan)  # as it was: planned now, and the default model's spec and workers as they were
    assert not waits and [m.name for m in plan.models] == [DEFAULT_ID, "late"]
    assert plan.models[0] == kept.models[0] and plan.workers_of(DEFAULT_ID) == kept.workers_of(DEFAULT_ID)
    assert [w.worker_id for w in plan.workers_of("late")] == ["cpu@late"]
    assert plan.models[1].path == str(late) and plan.models[1].memory["cpu"] > DEFAULT.stat().st_size
    late.unlink()
    plan, waits = look(plan)
    assert not waits and [m.name for m in plan.models] == [DEFAULT_ID] and plan.workers == kept.workers
