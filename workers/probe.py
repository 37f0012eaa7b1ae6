"""Does an engine run here with these settings? One probe, in its own process (see infersnap/probes.py).

    python -m infersnap.workers.probe --engine NAME --device DEV --model PATH --threads T [--cpus 0,1]
        [--options JSON]

It builds the engine as a worker would, reads two prompts as one batch and generates a few tokens of
each (native kernels that crash on some machines, ggml's AMX matrix multiply among them, run only on a
batch of more than one row), and where the runtime embeds on this device, embeds two inputs the same
way. It prints one JSON line on stdout: {"ran": true}, or {"refused": WHY} when the engine refuses the
model with an error (any settings would: a damaged file). A crash kills the process; faulthandler
writes where on stderr, and the caller reads the signal.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from pathlib import Path

import msgspec

from infersnap import runtimes, wire
from infersnap.engines import manifests
from infersnap.profiles import EngineOptions
from infersnap.workers.engine_base import Engine, EngineSettings
from infersnap.workers.faults import Fault
from infersnap.workers.worker import engine_class, only_device, pin_to

CONTEXT = 256  # tokens per sequence: enough for the prompts below, small to allocate
TOKENS = 4  # generated per sequence
MOST_STEPS = 500  # a probe that has not finished by then has hung in Python, not crashed
PROMPTS = ["The river runs past the old mill and the", "Seven sailors found a map of the island where"]


class Refused(Exception):
    pass


def drive(engine: Engine, requests: list[wire.Request], fault: Fault) -> None:
    """Add the requests and step until each has its last output; Refused on any error output."""
    pending = {r.id for r in requests}
    for request in requests:
        fault.request()
        refused = engine.add(request)
        if isinstance(refused, wire.Failure):
            raise Refused(refused.message)
    for _ in range(MOST_STEPS):
        if not pending:
            return
        fault.step()
        for output in engine.step():
            if isinstance(output, wire.Failure):
                raise Refused(output.message)
            if isinstance(output, wire.Ending):
                pending.discard(output.id)
    raise Refused(f"the engine did not finish {len(pending)} short requests in {MOST_STEPS} steps")


def probe(engine_name: str, device: str, model: str, threads: int, options: EngineOptions) -> str:
    """"" when the engine ran, else why it refused; a crash does not return."""
    runtime = manifests()[engine_name].runtime
    gpu_layers = manifests()[engine_name].settings.gpu_layers
    settings = EngineSettings(model, device, len(PROMPTS), CONTEXT, threads, gpu_layers, options=options)
    tasks = [t for t in ("generate", "embed") if runtimes.does(runtime, t) and (t == "generate" or device == "cpu")]
    for task in tasks:
        fault = Fault("probe", engine_name, options.label, model, task)
        try:
            fault.loading()
            engine = engine_class(runtime, task)(settings)
        except Exception as exc:  # the runtime's own error: a damaged file, an unknown device, no memory
            return f"{task}: {exc}"
        if task == "embed":
            requests: list[wire.Request] = [wire.Embed(id="probe-embed", model="probe", texts=PROMPTS)]
        else:
            params = wire.SamplingParams(max_tokens=TOKENS, temperature=0.0)
            requests = [wire.Generate(id=f"probe-{i}", model="probe", params=params, prompt=text)
                        for i, text in enumerate(PROMPTS)]
        try:
            drive(engine, requests, fault)
        except Refused as exc:
            return f"{task}: {exc}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, choices=sorted(manifests()))
    parser.add_argument("--device", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to run on (the worker's)")
    parser.add_argument("--options", default="{}", help="the EngineOptions to try, as JSON")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a crash in native code says where, on stderr
    out = os.fdopen(os.dup(1), "w")  # stdout carries the answer alone: whatever a runtime prints goes to stderr
    os.dup2(2, 1)
    pin_to([int(c) for c in args.cpus.split(",") if c.strip()])
    only_device(args.device)  # before the runtime starts
    options = msgspec.json.decode(args.options, type=EngineOptions)
    why = probe(args.engine, args.device, str(Path(args.model).absolute()), args.threads, options)
    out.write(msgspec.json.encode({"refused": why} if why else {"ran": True}).decode() + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
