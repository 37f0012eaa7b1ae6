"""The web chat at /, in a real browser: Debian's Chromium driven by Playwright, against the real server
and model. The page's pure parts (markdown.js, sse.js, store.js) run in the same browser, imported
from the server as the page imports them."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Server, cli, wait_until
from infersnap.models import default_model_path
from infersnap.frontend.app import create_app
from infersnap.plan import ModelSpec, ServePlan

CHROMIUM = "/usr/bin/chromium"
HOW_TO_INSTALL = "Chromium is not installed: `apt-get install chromium` as root (`make test` does it when run as root)"
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
if not Path(CHROMIUM).exists():
    pytest.skip(HOW_TO_INSTALL, allow_module_level=True)
expect = sync_api.expect

pytestmark = pytest.mark.one_engine  # the page is the same on either runtime
KEY = "webui-key"  # one of conftest.KEYS
SHORT = {"max_tokens": 48, "temperature": 0}  # the page's settings for an answer that ends soon
SOME_TEXT = re.compile(r"\S")
LIST_STARTED = re.compile(r"\S\s*\S")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        # Debian's Chromium: Playwright never downloads a browser of its own here
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


def open_page(browser, base: str, settings: dict | None = None, key: str | None = None, **context: object):
    """The chat in a fresh browser context (its own, empty localStorage), with settings and key stored
    first as the page would have stored them; a reload keeps what the page changed since."""
    page = browser.new_context(**context).new_page()
    seed = {"infersnap.settings": json.dumps(settings)} if settings else {}
    if key:
        seed["infersnap.api-key"] = key
    page.add_init_script(f"""for (const [k, v] of Object.entries({json.dumps(seed)}))
        if (localStorage.getItem(k) === null) localStorage.setItem(k, v);""")
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors
    page.goto(f"{base}/")
    return page


@pytest.fixture()
def chat(browser, server: Server):
    page = open_page(browser, server.base, SHORT)
    expect(page.locator("#model option")).not_to_have_count(0)
    yield page
    assert page.errors == []
    page.context.close()


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_answer(page):
    return page.locator("article.assistant").last


def wait_for_answer(page, timeout: float = 90_000) -> None:
    expect(last_answer(page)).not_to_have_class("message assistant streaming", timeout=timeout)
    expect(page.locator("#send")).to_be_visible(timeout=timeout)


def running(server: Server) -> int:
    return sum(w["running"] for w in server.status()["workers"])


def evaluate_module(page, module: str, body: str):
    """Run `body` (an async function body seeing the module as `m`) in the page, the module imported
    from the server as the page imports it."""
    return page.evaluate(f"async () => {{ const m = await import('/webui/{module}'); {body} }}")


# --- served as part of the API -----------------------------------------------------------------


def test_the_page_and_its_files_come_from_the_package_with_a_strict_policy(server, http):
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name, kind in [("app.js", "text/javascript"), ("markdown.js", "text/javascript"), ("style.css", "text/css")]:
        asset = http.get(f"/webui/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        assert asset.content == (Path(__file__).parents[1] / "frontend" / "webui" / name).read_bytes()
    for missing in ("/webui/nothing.js", "/webui/%2e%2e%2fwebui.py", "/webui/../app.py"):
        assert http.get(missing).status_code == 404, missing
    assert http.get("/webui/nothing.js").json()["error"]["code"] == "not_found"


def test_webui_enabled_false_serves_no_page():
    plan = ServePlan(host="127.0.0.1", port=1, max_body_bytes=1024, models=[ModelSpec("m", "m.gguf", 128)],
                     max_waiting=0, request_timeout=0, verbose=False, workers=[], webui=False)
    paths = {route.path for route in create_app(plan).router.routes}
    assert "v1/status" in paths  # the API's status is not the page's
    assert "" not in paths and not any(p.startswith("webui") for p in paths)
    assert plan.webui_url == "http://localhost:1/"


def test_v1_status_is_the_document_infersnap_status_prints(server, http):
    served = http.get("/v1/status").json()
    printed = json.loads(cli(server.env, "status", "--format", "json").stdout)
    for document in (served, printed):  # how long a model has been idle moves on between the two
        for model in document["models"]:
            model.pop("idle", None)
    assert served == printed
    assert served["endpoints"]["webui"] == f"http://localhost:{server.port}/"


def test_infersnap_webui_prints_the_url_and_opens_it_on_a_desktop(server, tmp_path):
    env = {k: v for k, v in server.env.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    assert cli(env, "webui").stdout.strip() == f"http://localhost:{server.port}/"
    opened = tmp_path / "opened"
    fake_browser = tmp_path / "browser"
    fake_browser.write_text(f"#!/bin/sh\necho \"$1\" > {opened}\n")
    fake_browser.chmod(0o755)
    cli({**env, "DISPLAY": ":0", "BROWSER": str(fake_browser)}, "webui")  # webbrowser runs $BROWSER
    assert opened.read_text().strip() == f"http://localhost:{server.port}/"
    cli({**env, "WAYLAND_DISPLAY": "wayland-0", "BROWSER": str(fake_browser)}, "webui", "--no-open")
    assert opened.read_text().strip() == f"http://localhost:{server.port}/"  # not opened again
    opened.unlink()


# --- chatting with the real model --------------------------------------------------------------


def test_the_picker_lists_what_v1_models_lists_and_selects_the_first(chat, http):
    listed = [m["id"] for m in http.get("/v1/models").json()["data"]]
    options = chat.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert options == listed
    assert chat.input_value("#model") == listed[0]


def test_an_answer_streams_in_token_by_token_and_a_reload_keeps_the_conversation(chat, server):
    requests: list[dict] = []
    chat.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    chat.evaluate("""() => {
        window.states = [];
        new MutationObserver(() => {
            const answer = document.querySelector("article.assistant:last-of-type .content");
            const text = answer ? answer.textContent : "";
            if (text && window.states.at(-1) !== text) window.states.push(text);
        }).observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
    }""")
    send(chat, "Tell me about the moon, briefly.")
    wait_for_answer(chat)
    answer = last_answer(chat).locator(".content").text_content()
    states = chat.evaluate("window.states")
    assert len(states) >= 3, states  # it grew while streaming, not all at once
    assert states[-1] == answer and all(len(s) <= len(answer) + 3 for s in states)
    assert requests[0]["stream"] is True and requests[0]["stream_options"] == {"include_usage": True}
    assert requests[0]["max_tokens"] == SHORT["max_tokens"]
    meta = last_answer(chat).locator(".meta").text_content()
    assert "tok/s" in meta and "first token" in meta, meta

    chat.click("#open-status")
    expect(chat.locator("#workers tr[data-worker=cpu] .state")).to_have_text("ready")
    expect(chat.locator("#workers tr[data-worker=cpu] .running")).to_have_text("0 of 4")
    expect(chat.locator("#status-last")).to_contain_text("tok/s")
    chat.keyboard.press("Escape")

    chat.reload()
    expect(chat.locator("#conversations .title")).to_have_text(["Tell me about the moon, briefly."])
    expect(chat.locator("article.user .content")).to_have_text("Tell me about the moon, briefly.")
    expect(last_answer(chat).locator(".content")).to_have_text(answer)
    expect(last_answer(chat).locator(".meta")).to_have_text(meta)


def test_stop_and_escape_end_the_generation_on_the_server(chat, server):
    chat.click("#open-settings")
    chat.fill("#max-tokens", "4000")
    chat.fill("#temperature", "0")
    chat.click("#settings button[value=save]")
    send(chat, "Count from 1 to 3000, one number per line.")
    # the answer is a numbered list: "1" shows as text, then "1." as an empty list (a Stop there would keep an
    # answer that shows nothing); two characters shown mean "1. 1\n2. 2" or more, which no later token empties
    expect(last_answer(chat).locator(".content")).to_have_text(LIST_STARTED, timeout=60_000)
    wait_until(lambda: running(server) == 1, 30, "the server runs no generation")
    chat.click("#stop")
    wait_until(lambda: running(server) == 0, 15, "the server still generates after Stop")
    expect(last_answer(chat).locator(".meta")).to_have_text("Stopped.")
    kept = last_answer(chat).locator(".content").text_content()
    assert kept

    chat.click("#new-chat")  # the same again, greedy, so as long; stopped from the keyboard alone
    send(chat, "Count from 1 to 3000, one number per line.")
    expect(last_answer(chat).locator(".content")).to_have_text(SOME_TEXT, timeout=60_000)
    wait_until(lambda: running(server) == 1, 30, "the server runs no generation")
    chat.keyboard.press("Escape")
    expect(last_answer(chat).locator(".meta")).to_have_text("Stopped.")
    wait_until(lambda: running(server) == 0, 15, "the server still generates after Escape")
    chat.locator("#conversations .title").last.click()  # the first, older one
    chat.reload()
    expect(last_answer(chat).locator(".content")).to_have_text(kept)  # what came before Stop is kept


def test_errors_are_told_in_words_and_retry_sends_again(chat):
    # A real 400: the answer asked for does not fit the context (8192 tokens).
    chat.click("#open-settings")
    chat.fill("#max-tokens", "30000")
    chat.click("#settings button[value=save]")
    send(chat, "Hello")
    error = last_answer(chat).locator(".error")
    expect(error).to_contain_text("does not fit the model's context")
    expect(error).to_contain_text("maximum context length is")
    expect(error.get_by_role("button", name="Retry")).to_have_count(0)  # sending it again would fail again

    # A model that failed to load answers 503 with why; Retry helps once it is back.
    failed = {"error": {"message": "the model could not be loaded: unsupported tensor type", "type": "server_error",
                        "param": None, "code": None}}
    calls = []

    def once_failed(route):
        calls.append(route.request.post_data_json)
        if len(calls) == 1:
            route.fulfill(status=503, json=failed, headers={"Retry-After": "1"})
        else:
            route.continue_()

    chat.route("**/v1/chat/completions", once_failed)
    chat.click("#open-settings")
    chat.fill("#max-tokens", "16")
    chat.click("#settings button[value=save]")
    send(chat, "Hello again")
    expect(error).to_contain_text("The model is not available.")
    expect(error).to_contain_text("unsupported tensor type")
    error.get_by_role("button", name="Retry").click()
    wait_for_answer(chat)
    expect(last_answer(chat).locator(".content")).not_to_be_empty()
    expect(last_answer(chat).locator(".error")).to_be_hidden()
    assert calls[0]["messages"] == calls[1]["messages"]  # the same conversation, sent again
    assert [m["content"] for m in calls[1]["messages"]] == ["Hello", "Hello again"]


# --- the page's own parts, with what the server would send -------------------------------------

HOSTILE = [
    '<img src=x onerror="window.pwned = 1">',
    "<script>window.pwned = 2</script>",
    '<svg onload="window.pwned = 3"></svg>',
    "[click](javascript:window.pwned=4)",
    "[data](data:text/html,<script>alert(1)</script>)",
    '**<iframe src="javascript:window.pwned=5"></iframe>**',
    "```html\n<script>window.pwned = 6</script>\n```",
    "`<b onmouseover=window.pwned=7>x</b>`",
    '<a href="javascript:window.pwned=8">x</a>',
]
SHOWN = [  # how each shows: as the characters it is (a code span or block without its marks, a link as its text)
    '<img src=x onerror="window.pwned = 1">', "<script>window.pwned = 2</script>", '<svg onload="window.pwned = 3"></svg>',
    "click", "[data](data:text/html,<script>alert(1)</script>)", '<iframe src="javascript:window.pwned=5"></iframe>',
    "<script>window.pwned = 6</script>", "<b onmouseover=window.pwned=7>x</b>", '<a href="javascript:window.pwned=8">x</a>',
]


def sse_body(*deltas: dict, final: dict | None = None) -> str:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **(final or {})})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def assert_inert(page, selector: str) -> None:
    page.wait_for_timeout(200)  # an onerror or onload would have fired by now
    assert page.evaluate("window.pwned") is None
    found = page.eval_on_selector(selector, """root => ({
        elements: root.querySelectorAll("img, script, svg, iframe, object, embed").length,
        handlers: [...root.querySelectorAll("*")].flatMap(e => [...e.attributes].map(a => a.name))
                     .filter(name => name.startsWith("on")),
        hrefs: [...root.querySelectorAll("a")].map(a => a.getAttribute("href")),
    })""")
    assert found["elements"] == 0 and found["handlers"] == [], found
    assert all(h.startswith(("http://", "https://")) for h in found["hrefs"]), found


def test_the_markdown_renderer_never_executes_model_output(chat):
    shown = evaluate_module(chat, "markdown.js", f"""
        const box = document.createElement("div");
        box.id = "hostile";
        document.body.append(box);
        for (const text of {json.dumps(HOSTILE)}) box.append(m.renderMarkdown(text));
        return box.textContent;""")
    assert_inert(chat, "#hostile")
    for text in SHOWN:  # as the characters they are
        assert text in shown


def test_a_streamed_answer_shows_its_reasoning_folded_and_hostile_text_as_text(chat):
    body = sse_body({"role": "assistant", "reasoning_content": "The user wants "},
                    {"reasoning_content": "a greeting."},
                    *({"content": text + "\n\n"} for text in HOSTILE),
                    final={"timings": {"prompt_n": 5, "prompt_ms": 10.0, "prompt_per_second": 500.0, "predicted_n": 12,
                                       "predicted_ms": 200.0, "predicted_per_second": 60.0}})
    chat.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, body=body, headers={"Content-Type": "text/event-stream"}))
    send(chat, "Hi")
    wait_for_answer(chat)
    thinking = last_answer(chat).locator("details.thinking")
    expect(thinking).to_be_visible()
    expect(thinking).not_to_have_attribute("open", "")  # folded until asked
    expect(thinking.locator(".thinking-text")).to_have_text("The user wants a greeting.")
    assert last_answer(chat).evaluate("a => a.firstElementChild.matches('details.thinking')")  # above the answer
    # the server's own figures, from the last chunk's timings; the first token as the page saw it
    expect(last_answer(chat).locator(".meta")).to_have_text(re.compile(r"^12 tokens · 60\.0 tok/s · first token \d+\.\d\d s$"))
    assert_inert(chat, "#messages")
    chat.reload()  # and so it stays once kept
    assert_inert(chat, "#messages")
    expect(last_answer(chat).locator(".thinking-text")).to_have_text("The user wants a greeting.")


def test_markdown_renders_what_answers_use(browser, server):
    page = open_page(browser, server.base, permissions=["clipboard-read", "clipboard-write"])
    source = "\n".join([
        "# Title", "", "Some **bold**, *italic*, _also_, ~~gone~~ and `code <b>`.", "second line",
        "", "- one", "- two", "  - nested", "- [site](https://example.com/a_(b))", "",
        "3. three", "4. four", "", "> quoted", "", "---", "",
        "```python", "print('<hi>')", "", "x = 1", "```", "", "see https://example.org/x.", "[rel](/etc/passwd)",
    ])
    html = evaluate_module(page, "markdown.js", f"""
        const box = document.createElement("div");
        box.id = "rendered";
        box.append(m.renderMarkdown({json.dumps(source)}));
        document.body.append(box);
        return box.innerHTML;""")
    expected = (
        "<h1>Title</h1><p>Some <strong>bold</strong>, <em>italic</em>, <em>also</em>, <del>gone</del> and "
        "<code>code &lt;b&gt;</code>.<br>second line</p>"
        '<ul><li>one</li><li>two<ul><li>nested</li></ul></li><li><a href="https://example.com/a_(b)" target="_blank" '
        'rel="noopener noreferrer nofollow">site</a></li></ul>'
        '<ol start="3"><li>three</li><li>four</li></ol><blockquote><p>quoted</p></blockquote><hr>'
        '<div class="code-block"><div class="code-bar"><span>python</span><button type="button" class="copy" '
        'aria-label="Copy the python block">Copy</button></div><pre><code data-language="python">'
        "print('&lt;hi&gt;')\n\nx = 1</code></pre></div>"
        '<p>see <a href="https://example.org/x" target="_blank" rel="noopener noreferrer nofollow">'
        "https://example.org/x</a>.<br>rel</p>"
    )
    assert html == expected
    page.click("#rendered .copy")
    expect(page.locator("#rendered .copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print('<hi>')\n\nx = 1"
    # while streaming, a fence not yet closed is a code block already
    assert evaluate_module(page, "markdown.js", "return m.renderMarkdown('x\\n```js\\nlet a').querySelector('code').textContent") == "let a"
    assert page.errors == []
    page.context.close()


def test_the_sse_parser_reads_events_split_anywhere(chat):
    stream = 'data: {"a":1}\r\n\r\n: a comment\n\nevent: named\ndata: two\ndata: lines\n\ndata:[DONE]\r\rdata: tail'
    results = evaluate_module(chat, "sse.js", f"""
        const text = {json.dumps(stream)};
        const read = (pieces) => {{
            const parser = new m.SSEParser();
            return [...pieces.flatMap(p => parser.feed(p)), ...parser.end()];
        }};
        const whole = read([text]);
        const splits = [];
        for (let i = 0; i <= text.length; i++) splits.push(read([text.slice(0, i), text.slice(i)]));
        return {{whole, splits, chars: read([...text])}};""")
    expected = [{"event": "message", "data": '{"a":1}'}, {"event": "named", "data": "two\nlines"},
                {"event": "message", "data": "[DONE]"}, {"event": "message", "data": "tail"}]
    assert results["whole"] == expected
    assert results["chars"] == expected
    assert all(split == expected for split in results["splits"])


def test_conversations_are_listed_renamed_deleted_exported_and_imported(chat, tmp_path):
    conversations = [
        {"id": "a", "title": "First", "created": 1, "updated": 2, "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "**hello**", "extra": "dropped"}]},
        {"id": "b", "title": "Second", "created": 1, "updated": 3, "messages": [{"role": "tool", "content": "x"}]},
    ]
    exported = tmp_path / "chats.json"
    exported.write_text(json.dumps({"format": "infersnap-chats", "version": 1, "conversations": conversations}))
    chat.set_input_files("#import", str(exported))
    titles = chat.locator("#conversations .title")
    expect(titles).to_have_text(["Second", "First"])  # the latest first
    expect(chat.locator("#notice")).to_have_text("Imported 2 conversations.")
    titles.nth(1).click()
    expect(chat.locator("article.assistant strong")).to_have_text("hello")

    chat.get_by_role("button", name="Rename First").click()
    chat.keyboard.press("Control+A")
    chat.keyboard.type("Renamed")
    chat.keyboard.press("Enter")
    expect(titles).to_have_text(["Second", "Renamed"])
    chat.click("#new-chat")
    expect(titles).to_have_count(3)
    delete = chat.get_by_role("button", name="Delete Second")
    delete.click()
    expect(titles).to_have_count(3)  # a first click only asks
    chat.get_by_role("button", name="Delete Second").click()
    expect(titles).to_have_text(["New chat", "Renamed"])

    chat.reload()
    expect(titles).to_have_text(["New chat", "Renamed"])
    with chat.expect_download() as download:
        chat.click("#export")
    document = json.loads(Path(download.value.path()).read_text())
    assert document["format"] == "infersnap-chats"
    renamed = next(c for c in document["conversations"] if c["title"] == "Renamed")
    assert renamed["id"] == "a" and renamed["messages"] == conversations[0]["messages"][:1] + [
        {"role": "assistant", "content": "**hello**"}]

    chat.set_input_files("#import", str(exported))  # again: copies with new ids, nothing overwritten
    expect(titles).to_have_count(4)
    ids = chat.evaluate("JSON.parse(localStorage.getItem('infersnap.chats')).conversations.map(c => c.id)")
    assert len(set(ids)) == 4
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    chat.set_input_files("#import", str(bad))
    expect(chat.locator("#notice")).to_contain_text("could not be imported")
    expect(titles).to_have_count(4)


def test_a_phone_width_screen_and_the_keyboard_alone(browser, server):
    page = open_page(browser, server.base, SHORT, viewport={"width": 390, "height": 800}, has_touch=True)
    expect(page.locator("#model option")).not_to_have_count(0)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
    sidebar = page.locator("#sidebar")
    assert not sidebar.evaluate("e => e.getBoundingClientRect().right > 0")  # slid away
    page.click("#toggle-sidebar")
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    page.click("#new-chat")
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().right <= 0")
    expect(page.locator("#prompt")).to_be_focused()
    page.keyboard.type("Say hello.")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("Just that.")
    assert page.input_value("#prompt") == "Say hello.\nJust that."
    page.keyboard.press("Enter")
    wait_for_answer(page)
    expect(page.locator("article.user .content")).to_have_text("Say hello.\nJust that.")
    assert page.input_value("#prompt") == ""
    for box in page.eval_on_selector_all("#composer, article", "es => es.map(e => e.getBoundingClientRect().right)"):
        assert box <= 390
    assert page.errors == []
    page.context.close()


# --- the server with API keys and no room to queue (conftest.keyed_server) ---------------------------------------


def test_the_page_asks_for_a_key_keeps_it_and_says_when_it_is_wrong(browser, keyed_server):
    assert httpx.get(f"{keyed_server.base}/").status_code == 200  # the page itself needs no key
    page = open_page(browser, keyed_server.base, SHORT)
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-message")).to_have_text("This server needs an API key (401).")
    page.fill("#key", "not-the-key")
    page.press("#key", "Enter")
    expect(page.locator("#key-message")).to_have_text("The API key was not accepted (401).")
    expect(page.locator("#notice")).to_contain_text("Incorrect API key")
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    expect(page.locator("#model option")).to_have_count(3)  # the models of the keyed server
    expect(dialog).to_be_hidden()
    expect(page.locator("#notice")).to_be_hidden()
    send(page, "Hi")
    wait_for_answer(page)
    expect(last_answer(page).locator(".content")).not_to_be_empty()

    page.reload()  # kept
    expect(page.locator("#model option")).to_have_count(3)
    expect(dialog).to_be_hidden()
    page.click("#open-status")
    expect(page.locator("#workers tr[data-worker=cpu] .state")).to_have_text("ready")  # /v1/status, with the key
    assert page.errors == []
    page.context.close()


def test_a_full_server_is_told_as_busy_and_retry_works_once_it_has_room(browser, keyed_server):
    page = open_page(browser, keyed_server.base, SHORT, key=KEY)
    expect(page.locator("#model option")).to_have_count(3)
    body = {"messages": [{"role": "user", "content": "Count from 1 to 3000."}], "max_tokens": 4000, "stream": True,
            "logit_bias": {"0": -100, "2": -100}}  # no end-of-text: it holds the slot until released
    started, release = threading.Event(), threading.Event()

    def occupy() -> None:  # the one slot, until released
        with httpx.stream("POST", f"{keyed_server.url}/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as reply:
            for _ in reply.iter_lines():
                started.set()
                if release.is_set():
                    return

    blocker = threading.Thread(target=occupy)
    blocker.start()
    try:
        assert started.wait(60), "the long generation did not start"
        send(page, "Hello")
        error = last_answer(page).locator(".error")
        expect(error).to_contain_text("The server is busy")
        retry = error.get_by_role("button", name="Retry")
        expect(retry).to_be_visible()
    finally:
        release.set()
        blocker.join(60)
    wait_until(lambda: running(keyed_server) == 0, 15, "the long generation still runs")
    retry.click()
    wait_for_answer(page)
    expect(last_answer(page).locator(".content")).not_to_be_empty()
    expect(last_answer(page).locator(".error")).to_be_hidden()
    assert page.errors == []
    page.context.close()


def test_the_picker_switches_models_and_the_one_picked_loads_and_answers(browser, keyed_server):
    page = open_page(browser, keyed_server.base, SHORT, key=KEY)
    default = default_model_path().name.removesuffix(".gguf")
    expect(page.locator("#model option")).to_have_count(3)
    options = page.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.disabled, o.textContent])")
    assert options == [[default, False, default], ["gemma3-270m", True, "gemma3-270m (no chat template)"],
                       ["smol-copy", False, "smol-copy (unloaded)"]]
    assert page.input_value("#model") == default
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.select_option("#model", "smol-copy")
    send(page, "Say hi.")
    wait_for_answer(page)
    expect(last_answer(page).locator(".content")).to_have_text(SOME_TEXT)
    assert sent[-1]["model"] == "smol-copy"
    card = httpx.get(f"{keyed_server.url}/models/smol-copy", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert card["state"] == "loaded"  # loaded by that message
    page.reload()
    expect(page.locator("#model option")).to_have_count(3)
    assert page.input_value("#model") == "smol-copy"  # the choice is kept
    # a model added while the server runs is in the picker the next time it is opened, without a reload
    cli(keyed_server.env, "models", "add", str(default_model_path()), "--name", "smol-late", "--copy")
    wait_until(lambda: "smol-late" in [m["id"] for m in httpx.get(
        f"{keyed_server.url}/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]], 15,
        "a model added while serving was not listed")
    page.focus("#model")
    expect(page.locator("#model option")).to_have_count(4)
    assert page.locator("#model option").last.text_content() == "smol-late (unloaded)"
    assert page.input_value("#model") == "smol-copy"
    assert page.errors == []
    page.context.close()
