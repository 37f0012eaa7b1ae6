"""Measure one engine on one device: the profile the broker routes by (see infersnap/profiles.py).

    python -m infersnap.workers.profile --engine NAME --device DEV --threads T --context C --model PATH
        [--cpus 0,1] [--streams 1,2,4,8,16] [--quick] [--key KEY]

Prints one JSON Profile on stdout (anything the runtimes print goes to stderr) and its progress on
stderr; exits 0 even when the engine cannot load or fails while measured: the Profile's `error` says why.

It builds the engine as a worker does (pinned to the worker's CPUs, seeing only its device, with slots
= the most streams measured) and drives it in-process through add()/step(), alone on its cores:
- load: seconds to build the engine;
- prompts: a lone request's prompt of ~128 and ~1024 tokens, seconds to its first token;
- generation: at each streams level, that many distinct prompts at once, greedy; generated tokens/s of
  all streams together, counted while every stream is generating (from the step where the last one
  has its first token to the step where the first one is done), and the median time to first token.
  No end-of-text token is banned (its id is the model's own): a request that ends early is replaced
  at once by one that asks for the rest, so every stream keeps generating until it has its tokens;
- memory: the process's PSS once it has run its most streams (llama.cpp's weights are mapped from
  the file and shared, so RSS would count them again in every worker).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import msgspec

from infersnap import profiles, wire
from infersnap.engines import manifests
from infersnap.profiles import EngineOptions, Level, Profile, PromptRead, Speed, Subject
from infersnap.workers.engine_base import Engine, EngineSettings
from infersnap.workers.worker import engine_class, only_device, pin_to

FULL = {"streams": [1, 2, 4, 8, profiles.MOST_STREAMS], "tokens": 128, "prompts": [128, 1024]}
QUICK = {"streams": [1, 4], "tokens": 16, "prompts": [32, 128]}
GENERATION_PROMPT_TOKENS = 32
CONTENDED = 0.1  # share of the cores' time others took, past which the figures are said to be low
REPEAT_BELOW = 5.0  # seconds: a level's run shorter than this is run twice (see best_generation)

# Plain words for prompts: each prompt starts with its own number and words, so no engine's prefix
# cache serves one prompt from another's.
WORDS = (
    "river mountain lantern garden silver quiet morning harbor window candle forest meadow journey "
    "engine paper bridge winter summer market castle dragon kitchen violin ocean thunder pebble "
    "marble copper velvet orchard compass ladder saddle island valley shadow feather whisper "
    "captain doctor farmer painter sailor teacher baker tailor miller weaver hunter poet "
    "walks finds carries builds paints follows opens watches keeps gathers answers remembers"
).split()


class MeasureError(Exception):
    """The engine refused or failed a request while being measured."""


def progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


class Driver:
    """Requests into an engine, outputs out; any refusal or failure stops the measurement."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.count = 0
        self.words = random.Random(1234)

    def prompt(self, tokens: int) -> str:
        """A prompt of about `tokens` tokens that shares no prefix with any other."""
        self.count += 1
        words = [self.words.choice(WORDS) for _ in range(max(1, tokens - 3))]  # about a token each
        return f"{self.count}. " + " ".join(words)

    def submit(self, prompt: str, max_tokens: int) -> str:
        request_id = f"p{self.count}-{len(prompt)}-{time.monotonic_ns()}"
        params = wire.SamplingParams(max_tokens=max_tokens, temperature=0.0)
        refused = self.engine.add(wire.Generate(id=request_id, model="profile", params=params, prompt=prompt))
        if refused is not None:
            raise MeasureError(refused.message if isinstance(refused, wire.Failure) else "a request was refused")
        return request_id

    def step(self) -> list[wire.Output]:
        outputs = self.engine.step()
        for output in outputs:
            if isinstance(output, wire.Failure):
                raise MeasureError(output.message)
        return outputs

    def lone(self, prompt: str, max_tokens: int) -> tuple[float, wire.Final]:
        """Seconds from add to a lone request's first output, and its last output."""
        start = time.perf_counter()
        request_id = self.submit(prompt, max_tokens)
        first = 0.0
        while True:
            for output in self.step():
                if output.id == request_id:
                    first = first or time.perf_counter() - start
                    if isinstance(output, wire.Final):
                        return first, output


def prompt_read(driver: Driver, tokens: int, context: int) -> PromptRead:
    seconds, last = driver.lone(driver.prompt(min(tokens, context // 2)), 1)
    return PromptRead(tokens=last.prompt_tokens, seconds=round(seconds, 4))


def generation(driver: Driver, streams: int, tokens: int) -> Level:
    """`streams` requests at once, each generating `tokens` tokens (refilled when one ends early)."""
    stream_of: dict[str, int] = {}
    seen: dict[str, int] = {}  # request id -> completion tokens counted
    generated = [0] * streams
    added_at: dict[str, float] = {}
    first_at: dict[str, float] = {}
    start = time.perf_counter()
    for stream in range(streams):
        request_id = driver.submit(driver.prompt(GENERATION_PROMPT_TOKENS), tokens)
        stream_of[request_id], added_at[request_id] = stream, time.perf_counter()
    total = 0
    window_start: tuple[float, int] | None = None  # (time, tokens) once every stream generates
    window_end: tuple[float, int] | None = None  # once the first stream has all its tokens
    while stream_of:
        outputs = driver.step()
        now = time.perf_counter()
        done = False
        for output in outputs:
            stream = stream_of[output.id]
            # a chunk counts the tokens since the last one; the Final, all of them
            count = output.completion_tokens if isinstance(output, wire.Final) else seen.get(output.id, 0) + output.tokens
            gained = count - seen.get(output.id, 0)
            seen[output.id] = count
            generated[stream] += gained
            total += gained
            if output.id in added_at and output.id not in first_at and count:
                first_at[output.id] = now
            if not isinstance(output, wire.Final):
                continue
            del stream_of[output.id]
            if generated[stream] < tokens:  # the model ended its text: the stream asks for the rest
                request_id = driver.submit(driver.prompt(GENERATION_PROMPT_TOKENS), tokens - generated[stream])
                stream_of[request_id] = stream
            else:
                done = True
        if window_start is None and len(first_at) == streams:
            window_start = (now, total)
        if done and window_end is None:
            window_end = (now, total)
    end = time.perf_counter()
    if window_start and window_end and window_end[0] > window_start[0] and window_end[1] > window_start[1]:
        rate = (window_end[1] - window_start[1]) / (window_end[0] - window_start[0])
    else:  # too few steps to tell the generating part apart: the whole run
        rate = total / (end - start)
    ttft = statistics.median(first_at[i] - added_at[i] for i in first_at) if first_at else end - start
    return Level(streams=streams, tokens_per_second=round(rate, 2), ttft_seconds=round(ttft, 4))


def best_generation(driver: Driver, streams: int, tokens: int, repeat: bool) -> Level:
    """A level's run, done once more when it was short (under REPEAT_BELOW seconds): another process on
    these cores only ever slows a run down, so the faster of two is nearer the engine's own figure. (A
    long run under contention is not repeated: on 2 busy cores a llama.cpp run can take minutes.)"""
    start = time.perf_counter()
    level = generation(driver, streams, tokens)
    if repeat and time.perf_counter() - start < REPEAT_BELOW:
        level = max(level, generation(driver, streams, tokens), key=lambda lv: lv.tokens_per_second)
    return level


class Watch:
    """How much of this process's cores other processes took since it was made (0-1), from /proc/stat:
    whatever they take lowers every figure measured meanwhile."""

    def __init__(self) -> None:
        self.cores = set(os.sched_getaffinity(0))
        self.start = (time.perf_counter(), busy_seconds(self.cores), own_seconds())

    def seconds(self) -> float:
        return time.perf_counter() - self.start[0]

    def contention(self) -> float:
        wall = self.seconds()
        others = busy_seconds(self.cores) - self.start[1] - (own_seconds() - self.start[2])
        return min(max(others / (wall * len(self.cores)), 0.0), 1.0) if wall > 0 else 0.0


def busy_seconds(cpus: set[int]) -> float:
    """Seconds these CPUs have been busy since boot (stolen by the hypervisor included), from /proc/stat."""
    total = 0
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
                total += user + nice + system + irq + softirq + steal
    except (OSError, ValueError):
        return 0.0
    return total / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pss_bytes() -> int:
    """This process's proportional set size (0 where /proc does not tell it)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(subject: Subject, profile_key: str, streams: list[int], tokens: int, prompts: list[int],
            quick: bool = False) -> Profile:
    profile = Profile(engine=subject.engine, device=subject.device, key=profile_key, measured_at=profiles.now(),
                      threads=subject.threads, context=subject.context, quick=quick)
    pin_to(subject.cpus)
    only_device(subject.device)  # before the runtime starts
    settings = EngineSettings(subject.model_path, subject.device, max(streams), subject.context, subject.threads,
                              subject.gpu_layers, options=subject.options)
    start = time.perf_counter()
    try:
        engine = engine_class(subject.runtime, "generate")(settings)
    except Exception as exc:  # the engine's own message: bad file, unknown device, no memory
        profile.error = f"the engine could not load: {exc}"
        progress(profile.error)
        return profile
    profile.load_seconds = round(time.perf_counter() - start, 3)
    progress(f"loaded in {profile.load_seconds:.1f} s")
    driver = Driver(engine)
    watch = Watch()
    levels: list[Level] = []
    reads: list[PromptRead] = []
    try:
        driver.lone(driver.prompt(16), 4)  # warm-up: first-call costs are no part of any figure
        for length in prompts:
            read = prompt_read(driver, length, engine.context)
            reads.append(read)
            progress(f"prompt of {read.tokens} tokens read in {read.seconds:.2f} s "
                     f"({read.tokens / max(read.seconds, 1e-9):.0f} tokens/s)")
        for count in streams:
            level = best_generation(driver, count, tokens, repeat=not quick)
            levels.append(level)
            progress(f"{count} streams: {level.tokens_per_second:.0f} tokens/s, "
                     f"first token after {level.ttft_seconds:.2f} s")
    except Exception as exc:  # a refusal or a failing step: what was measured so far is kept
        profile.error = f"measuring failed: {exc}"
        progress(profile.error)
    profile.memory_bytes = pss_bytes()
    profile.contention = round(watch.contention(), 3)
    if profile.contention > CONTENDED:
        progress(f"other processes took {profile.contention:.0%} of these cores meanwhile: the figures are low")
    if levels and reads:
        profile.speed = Speed(levels=levels, prompts=sorted(reads, key=lambda r: r.tokens))
    return profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, choices=sorted(manifests()))
    parser.add_argument("--device", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--context", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to run on (the worker's)")
    parser.add_argument("--streams", help="comma-separated concurrency levels  [default: 1,2,4,8,16; quick: 1,4]")
    parser.add_argument("--quick", action="store_true", help="a short measurement (seconds), for tests")
    parser.add_argument("--key", help="the profile's key as the caller computed it  [default: computed here]")
    parser.add_argument("--options", default="{}", help="the runtime settings to run with (EngineOptions as JSON, as "
                        "infersnap/probes.py found them)")
    args = parser.parse_args(argv)
    # stdout carries the Profile alone: whatever a runtime prints goes to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    faulthandler.enable()  # a crash in native code says where, on stderr

    manifest = manifests()[args.engine]
    subject = Subject(engine=args.engine, runtime=manifest.runtime, device=args.device,
                      model_path=str(Path(args.model).absolute()), threads=args.threads, context=args.context,
                      cpus=[int(c) for c in args.cpus.split(",") if c.strip()],
                      gpu_layers=manifest.settings.gpu_layers,
                      options=msgspec.json.decode(args.options, type=EngineOptions))
    plan = QUICK if args.quick else FULL
    streams = sorted({int(s) for s in args.streams.split(",")}) if args.streams else plan["streams"]
    if args.key:
        profile_key = args.key
    else:
        from infersnap.hwdetect import detect

        profile_key = profiles.key(subject, detect("/"))
    profile = measure(subject, profile_key, streams, plan["tokens"], plan["prompts"], args.quick)
    out.write(msgspec.json.encode(profile).decode() + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
