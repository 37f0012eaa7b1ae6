"""Both engines in-process, no server: the same Generate requests through add()/step(), checked and timed.

    .venv/bin/python bench/engine_alone.py [--engines llamacpp,openvino] [--rounds 3] [--threads 2]

Checks per engine: greedy and seeded runs are repeatable, stop strings never show, max_tokens is exact,
an abort frees the slot, 8 concurrent requests all finish, unicode comes through whole, bad requests are
refused. Then aggregate generated tokens/s at 1 and 8 concurrent 128-token requests, engines interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

from infersnap import probes, wire
from infersnap.hwdetect import detect
from infersnap.profiles import Subject
from infersnap.workers.engine_base import EngineSettings
from infersnap.workers.worker import engine_class
from infersnap.models import default_model_path

STORY = [wire.ChatMessage("user", "Write a short story about a dragon who learns to cook.")]
NO_EOS = {2: -100.0}  # SmolLM2's <|im_end|>


CPU_ENGINE = {"llamacpp": "cpu", "openvino": "intel-cpu"}  # each runtime's CPU engine, for its probe


def build(name: str, threads: int, slots: int = 8, context: int = 2048):
    path = str(default_model_path())
    # the settings that run here (a probe in its own process, stored in the data folder): the defaults crash on some CPUs
    subject = Subject(engine=CPU_ENGINE[name], runtime=name, device="cpu", model_path=path, threads=threads, context=context)
    options = probes.find(subject, detect("/")).options
    if options is None:
        raise SystemExit(f"{name} crashes on this machine whatever its settings")
    start = time.perf_counter()
    engine = engine_class(name, "generate")(EngineSettings(path, "cpu", slots, context, threads, options=options))
    return engine, time.perf_counter() - start


_n = 0


def req(messages=None, prompt=None, **params) -> wire.Generate:
    global _n
    _n += 1
    return wire.Generate(id=f"r{_n}", model="m", params=wire.SamplingParams(**params), prompt=prompt, messages=messages)


def run(engine, requests, abort_after: dict[str, int] | None = None) -> dict[str, dict]:
    """Drive requests to the end; abort_after: request id -> abort once it has that many outputs."""
    results = {r.id: {"text": "", "outputs": 0, "finish": None} for r in requests}
    for r in requests:
        refused = engine.add(r)
        if refused is not None:
            results[r.id].update(finish="error", failure=refused)
    aborted = set()
    while engine.busy:
        for out in engine.step():
            res = results[out.id]
            assert out.id not in aborted, f"output after abort for {out.id}"
            assert res["finish"] is None, f"output after finish for {out.id}"
            chunk = out.last if isinstance(out, wire.Final) else out if isinstance(out, wire.Text) else None
            res["text"] += chunk.text if chunk is not None else ""
            res["outputs"] += 1
            if isinstance(out, wire.Final):
                res.update(finish=out.finish_reason, prompt_tokens=out.prompt_tokens,
                           completion_tokens=out.completion_tokens, timings=out.timings)
            elif isinstance(out, wire.Failure):
                res.update(finish="error", failure=out)
            if abort_after and abort_after.get(out.id) == res["outputs"]:
                engine.abort([out.id, "no-such-id"])
                aborted.add(out.id)
    return results


def one(engine, r: wire.Generate) -> dict:
    return run(engine, [r])[r.id]


def check(name: str, engine) -> list[str]:
    problems = []

    def expect(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            problems.append(what)

    a = one(engine, req(messages=STORY, max_tokens=40, temperature=0))
    b = one(engine, req(messages=STORY, max_tokens=40, temperature=0))
    expect(a["text"] == b["text"] and a["text"], f"greedy repeatable: {a['text'][:60]!r}")
    expect(a["timings"] is not None and a["timings"].predicted_n == a["completion_tokens"], f"timings {a['timings']}")

    s1 = one(engine, req(messages=STORY, max_tokens=24, temperature=1.0, seed=1234))
    s2 = one(engine, req(messages=STORY, max_tokens=24, temperature=1.0, seed=1234))
    s3 = one(engine, req(messages=STORY, max_tokens=24, temperature=1.0, seed=99))
    expect(s1["text"] == s2["text"], "same seed, same text")
    expect(s1["text"] != s3["text"], "other seed, other text")
    r1, r2 = req(messages=STORY, max_tokens=24, temperature=1.0, seed=1234), req(messages=STORY, max_tokens=24, temperature=1.0, seed=77)
    both = run(engine, [r2, r1])
    print(f"    (same seed while another request runs alongside: {'same' if both[r1.id]['text'] == s1['text'] else 'differs'})")

    words = a["text"].split()
    stop = " ".join(words[4:6])
    expected = a["text"][: a["text"].index(stop)]
    st = one(engine, req(messages=STORY, max_tokens=40, temperature=0, stop=[stop, "zzzz"]))
    expect(st["text"] == expected and st["finish"] == "stop", f"stop {stop!r}: {st['text']!r}")

    m = one(engine, req(messages=STORY, max_tokens=7, temperature=0.8, logit_bias=NO_EOS))
    expect(m["completion_tokens"] == 7 and m["finish"] == "length", f"max_tokens 7 -> {m['completion_tokens']} {m['finish']}")
    m = one(engine, req(messages=[wire.ChatMessage("user", "Hi")], max_tokens=200, temperature=0))
    expect(m["finish"] == "stop" and m["completion_tokens"] < 200, f"EOS -> stop after {m['completion_tokens']}")
    m = one(engine, req(messages=STORY, max_tokens=300, temperature=1.0, logit_bias=NO_EOS))
    expect(m["completion_tokens"] == 300 and m["finish"] == "length", f"EOS banned -> {m['completion_tokens']} {m['finish']}")

    long_ = req(messages=STORY, max_tokens=1500, temperature=1.0, logit_bias=NO_EOS)
    res = run(engine, [long_], abort_after={long_.id: 3})
    expect(res[long_.id]["finish"] is None and not engine.busy, "abort: no more outputs, engine idle")
    after = one(engine, req(messages=STORY, max_tokens=5, temperature=0))
    expect(after["finish"] in ("stop", "length"), "a request after the abort runs")
    if hasattr(engine, "pipe"):
        expect(not engine.pipe.has_non_finished_requests(), "pipeline holds nothing after abort")

    many = [req(messages=[wire.ChatMessage("user", f"Story {i}: a cat on a boat.")], max_tokens=64, temperature=0.7, seed=i) for i in range(8)]
    res = run(engine, many)
    expect(all(r["finish"] in ("stop", "length") and r["text"] for r in res.values()), "8 concurrent all finish")

    uni = "Repeat exactly: héllo 🙂 世界 ünïcödé ✓ Ωμέγα"
    u = one(engine, req(prompt=uni + "\n" + uni.split(": ")[1] + "\n" + uni, max_tokens=40, temperature=0))
    expect("\ufffd" not in u["text"] and u["text"], f"unicode: {u['text'][:50]!r}")

    big = one(engine, req(prompt="word " * 3000, max_tokens=10))
    expect(big["failure"] is not None and big["failure"].code == "context_length_exceeded" and big["failure"].param == "prompt", f"too long: {big['failure'].message[:80] if big.get('failure') else None}")
    big = one(engine, req(messages=STORY, max_tokens=5000))
    expect(big["failure"] is not None and big["failure"].param == "messages", "max_tokens past the context refused")
    e = one(engine, req(prompt="", max_tokens=5))
    expect(e["failure"] is not None and e["failure"].status == 400, "empty prompt refused")

    plain = one(engine, req(prompt="one one one one one one", max_tokens=12, temperature=0))
    pen = one(engine, req(prompt="one one one one one one", max_tokens=12, temperature=0, frequency_penalty=2.0, presence_penalty=2.0))
    expect(plain["text"] != pen["text"], "penalties change a repetitive answer")
    pt = one(engine, req(prompt="Hello", max_tokens=4, temperature=0, logit_bias={1000: 100}))
    print(f"    logit_bias +100: {pt.get('failure') or repr(pt['text'])}")
    p1 = one(engine, req(messages=[wire.ChatMessage("user", "Hi")], max_tokens=1))
    print(f"    prompt_tokens of 'Hi' chat: {p1['prompt_tokens']}")
    return problems


def burst(engine, clients: int, max_tokens: int, round_: int) -> tuple[float, float]:
    requests = [
        req(messages=[wire.ChatMessage("user", f"Story number {round_ * 100 + i}: write a long story about a dragon who learns to cook.")],
            max_tokens=max_tokens, temperature=0, logit_bias=NO_EOS)
        for i in range(clients)
    ]
    start = time.perf_counter()
    res = run(engine, requests)
    wall = time.perf_counter() - start
    ttft = statistics.median(r["timings"].prompt_ms for r in res.values())
    return sum(r["completion_tokens"] for r in res.values()) / wall, ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="llamacpp,openvino")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-checks", action="store_true")
    args = parser.parse_args()

    engines = {}
    for name in args.engines.split(","):
        engines[name], seconds = build(name, args.threads)
        print(f"{name}: loaded in {seconds:.1f} s, context {engines[name].context}")
    problems = {}
    if not args.no_checks:
        for name, engine in engines.items():
            print(f"{name} checks:")
            problems[name] = check(name, engine)
    figures: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        for clients in (1, 8):
            for name, engine in engines.items():
                figures.setdefault((name, clients), []).append(burst(engine, clients, args.max_tokens, round_))
    print(f"aggregate generated tokens/s, median of {args.rounds} (TTFT ms median), {args.max_tokens} tokens each:")
    for (name, clients), runs in figures.items():
        tps = statistics.median(r[0] for r in runs)
        ttft = statistics.median(r[1] for r in runs)
        print(f"  {name:9} x{clients}: {tps:7.1f} tok/s  ttft {ttft:6.0f} ms   runs {[round(r[0]) for r in runs]}")
    for name, found in problems.items():
        print(f"{name}: {'all checks passed' if not found else 'FAILED: ' + '; '.join(found)}")


if __name__ == "__main__":
    main()
