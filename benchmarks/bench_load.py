"""Load test of the Gradio app: concurrent gradio_client users mixing few-shot predictions with one long inversion.

The app (`app.build_demo`, with its real queue and concurrency limits) runs in a separate server process on
127.0.0.1, on a tiny CLIP-architecture ViT saved to a temporary local folder (random weights: nothing is downloaded).
`--clients` users each send `--requests` few-shot requests (3 classes x 2 support images + 3 queries, uploaded as
files, all different images per request so that the classifier's embedding cache does not answer them), with a
random pause of up to 0.2 s between requests. Meanwhile one more user uploads a LoRA and runs one inversion of
`--steps` steps with live previews. Everything is bounded: each client stops at its request count or at the
`--timeout` deadline, whichever comes first.

Reported: requests served correctly (every query predicted right on an easy colour task), errors by kind, latency
percentiles, predictions served while the inversion was running, the inversion's time and preview count, and the
server's memory: resident size sampled every 0.1 s and the kernel's peak (VmHWM), and the RSS after a warm-up and
after each round.

The load runs in `--rounds` rounds one after the other; the server's memory after each round shows whether it keeps
growing. Run from the repository root (about three minutes with the defaults):

    python -m benchmarks.bench_load [--clients 8] [--requests 15] [--steps 400] [--rounds 2] [--timeout 300]
                                    [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import REPO, environment, markdown_table, report_header

DEFAULT_OUT = REPO / "benchmarks" / "results" / "load.md"
TINY_CLIP = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=16)
COLOURS = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}

_logger = logging.getLogger("bench_load")


# ------------------------------------------------------------------------------------------------------ the server
def serve(backbone: str, pool: str, port: int) -> None:
    """Run the app (server mode of this script, in its own process)."""
    import app
    from app_ui import AppSettings

    settings = AppSettings(backbone=backbone, weights=Path(pool) / "no-weights", pool=Path(pool))
    demo = app.build_demo(settings=settings)
    demo.launch(server_name="127.0.0.1", server_port=port, quiet=True, **app.launch_options(settings))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append((time.monotonic(), _memory_kb(self.pid)["VmRSS"]))
            except (OSError, KeyError):
                return
            time.sleep(self.every)


# ------------------------------------------------------------------------------------------------------ the inputs
def _make_backbone(folder: Path) -> Path:
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_clip_224", pretrained=False, **TINY_CLIP)
    save_for_hf(model, folder, safe_serialization=True)
    return folder


def _make_lora(backbone: Path, folder: Path) -> Path:
    import torch

    from recycle.backbone import load_backbone
    from recycle.formats import LoRAAdapter, save_adapter
    from recycle.lora import LoRAConfig, inject_lora, lora_parameters, remove_lora

    model = load_backbone(str(backbone), device="cpu")
    inject_lora(model.model, LoRAConfig())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model.model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    head = torch.nn.Linear(model.num_features, 3)
    adapter = LoRAAdapter.from_model(model.model, LoRAConfig(), head, list(COLOURS), backbone=str(backbone))
    remove_lora(model.model)
    return save_adapter(adapter, folder)


def _image(colour: tuple[int, int, int], seed: int, path: Path) -> Path:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour, np.float32) + rng.normal(0, 12, (40, 40, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    return path


# ------------------------------------------------------------------------------------------------------ the clients
@dataclass
class Outcome:
    start: float
    end: float
    ok: bool
    error: str = ""


@dataclass
class Inversion:
    start: float = 0.0
    end: float = 0.0
    previews: int = 0
    status: str = ""
    error: str = ""


def _predictor(
    url: str,
    images: Path,
    client_id: int,
    requests: int,
    deadline: float,
    outcomes: list[Outcome],
    lock: threading.Lock,
) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    rng = random.Random(client_id)
    try:
        for r in range(requests):
            if time.monotonic() > deadline:
                return
            seed = 1000 * client_id + 10 * r
            kwargs = {}
            for i, (name, colour) in enumerate(COLOURS.items(), 1):
                files = [_image(colour, seed + k, images / f"c{client_id}-r{r}-{name}{k}.png") for k in range(2)]
                kwargs[f"class_{i}_name"] = name
                kwargs[f"class_{i}_images"] = [{"image": handle_file(str(f)), "caption": None} for f in files]
            order = list(COLOURS)
            rng.shuffle(order)
            queries = [
                _image(COLOURS[c], seed + 7, images / f"c{client_id}-r{r}-q{j}-{c}.png") for j, c in enumerate(order)
            ]
            start = time.monotonic()
            try:
                _, table = client.predict(
                    queries=[handle_file(str(q)) for q in queries], api_name="/classify", **kwargs
                )
                ok = [row[1] for row in table["data"]] == order
                outcome = Outcome(start, time.monotonic(), ok, "" if ok else "wrong prediction")
            except Exception as e:  # noqa: BLE001 - counted and reported
                outcome = Outcome(start, time.monotonic(), False, f"{type(e).__name__}: {str(e)[:80]}")
            with lock:
                outcomes.append(outcome)
            time.sleep(rng.random() * 0.2)
    finally:
        client.close()


def _inverter(url: str, lora: Path, steps: int, result: Inversion, started: threading.Event) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    try:
        client.predict(hub_id="", files=[handle_file(str(f)) for f in sorted(lora.iterdir())], api_name="/load_lora")
        result.start = time.monotonic()
        job = client.submit(
            classes=[0, 1, 2],
            per_class=4,
            steps=steps,
            pruning="-1:0.75",
            bn_prior=False,
            lr=0.25,
            seed=0,
            api_name="/invert",
        )
        started.set()
        for update in job:
            if len(update) > 2 and str(update[2]).startswith("⏳ Step"):
                result.previews += 1
        result.end = time.monotonic()
        result.status = job.outputs()[-1][2]
    except Exception as e:  # noqa: BLE001 - reported
        _logger.exception("the inversion client failed")
        result.error = f"{type(e).__name__}: {e}"
        result.end = time.monotonic()
    finally:
        started.set()
        client.close()


# ------------------------------------------------------------------------------------------------------ the report
def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": max(values), "mean": statistics.fmean(values)}


def _round(url: str, images: Path, lora: Path, args: argparse.Namespace, index: int) -> dict:
    """One load round: the inversion client plus the prediction clients, bounded by count and deadline."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    inversion = Inversion()
    started = threading.Event()
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    inverter = threading.Thread(target=_inverter, args=(url, lora, args.steps, inversion, started))
    inverter.start()
    started.wait(60)
    clients = [
        threading.Thread(
            target=_predictor, args=(url, images, 100 * index + c, args.requests, deadline, outcomes, lock)
        )
        for c in range(args.clients)
    ]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    predictions_done = time.monotonic()
    inverter.join(max(1.0, deadline - time.monotonic()))
    during = [o for o in outcomes if inversion.start <= o.start and o.end <= (inversion.end or predictions_done)]
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.error] = errors.get(o.error, 0) + 1
    return {
        "sent": len(outcomes),
        "served correctly": sum(o.ok for o in outcomes),
        "errors": errors,
        "latencies": [o.end - o.start for o in outcomes],
        "served during the inversion": sum(o.ok for o in during),
        "latencies during the inversion": [o.end - o.start for o in during],
        "prediction seconds": predictions_done - t0,
        "wall s": time.monotonic() - t0,
        "inversion": {
            "seconds": (inversion.end - inversion.start) if inversion.end else None,
            "previews": inversion.previews,
            "status": inversion.status,
            "error": inversion.error,
        },
    }


def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    backbone = _make_backbone(tmp / "backbone")
    lora = _make_lora(backbone, tmp / "lora")
    images = tmp / "images"
    images.mkdir()
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(tmp / "gr")}
    command = [sys.executable, "-m", "benchmarks.bench_load", "--serve", str(backbone), str(tmp / "pool"), str(port)]
    log = (tmp / "server.log").open("wb")
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    rounds = []
    try:
        from gradio_client import Client

        deadline = time.monotonic() + 120
        while True:
            try:
                Client(url, verbose=False).close()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "the app did not start: " + (tmp / "server.log").read_text(errors="replace")[-2000:]
                    ) from None
                time.sleep(0.5)
        memory = {"started": _memory_kb(server.pid)["VmRSS"]}
        warm: list[Outcome] = []  # one client, a few requests: loads the backbone and warms the caches
        _predictor(url, images, 99, 3, time.monotonic() + 60, warm, threading.Lock())
        memory["after warm-up"] = _memory_kb(server.pid)["VmRSS"]
        sampler = MemorySampler(server.pid)
        sampler.start()
        for r in range(args.rounds):
            rounds.append(_round(url, images, lora, args, r + 1))
            memory[f"after round {r + 1}"] = _memory_kb(server.pid)["VmRSS"]
        sampler.stop.set()
        sampler.join()
        memory["max sampled during the rounds"] = max(v for _, v in sampler.samples)
        memory["peak (VmHWM)"] = _memory_kb(server.pid)["VmHWM"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        server_errors = [
            line
            for line in (tmp / "server.log").read_text(errors="replace").splitlines()
            if "Traceback" in line or "ERROR" in line
        ]
    errors: dict[str, int] = {}
    for rnd in rounds:
        for k, v in rnd["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "config": {
            "clients": args.clients,
            "requests per client": args.requests,
            "inversion steps": args.steps,
            "rounds": args.rounds,
            "timeout s per round": args.timeout,
        },
        "sent": sum(r["sent"] for r in rounds),
        "planned": args.rounds * args.clients * args.requests,
        "served correctly": sum(r["served correctly"] for r in rounds),
        "errors": errors,
        "latency s": _percentiles([x for r in rounds for x in r["latencies"]]),
        "served during the inversion": sum(r["served during the inversion"] for r in rounds),
        "latency during the inversion s": _percentiles(
            [x for r in rounds for x in r["latencies during the inversion"]]
        ),
        "throughput req/s": (sum(r["sent"] for r in rounds) / max(sum(r["prediction seconds"] for r in rounds), 1e-9)),
        "wall s": sum(r["wall s"] for r in rounds),
        "inversions": [r["inversion"] for r in rounds],
        "memory kB": memory,
        "server log errors": server_errors[:20],
    }


def _markdown(results: dict, env: dict, started: str) -> str:
    lat, dur = results["latency s"], results["latency during the inversion s"]
    mem = results["memory kB"]
    invs = results["inversions"]
    fmt = lambda d, k: f"{d[k]:.2f}" if k in d else "-"  # noqa: E731
    lines = [
        report_header(
            "App load test", "bench_load.py", env, started, f"the load rounds took {results['wall s']:.1f} s"
        ),
        "",
        "## Setup",
        "",
        "- Server: `app.build_demo` in its own process on 127.0.0.1 (its queue: 32 waiting, predictions 2 at a time, "
        "one inversion at a time on its own backbone copy), on a tiny CLIP-architecture ViT (32 px, 16 tokens, "
        "2 blocks, random weights) from a temporary local folder.",
        f"- {results['config']['clients']} prediction clients (gradio_client, one session each), "
        f"{results['config']['requests per client']} requests each: 3 classes x 2 support images + 3 queries, all "
        "fresh 40 px PNG uploads, then a random pause of up to 0.2 s. A request is served correctly when all three "
        "queries get their class.",
        f"- One inversion client: uploads a LoRA (PEFT files), then inverts 3 classes x 4 images for "
        f"{results['config']['inversion steps']} steps with 75% pruning in the last block, streaming previews. It "
        "starts first; the prediction clients start once it is submitted. Its time runs from submitting to "
        "receiving the last update, including downloading every preview's images, as a user would; its final "
        "status has the app's own count (from the first step to the last).",
        f"- {results['config']['rounds']} rounds one after the other, each with its own inversion and "
        f"{results['config']['clients']} x {results['config']['requests per client']} requests and a deadline of "
        f"{results['config']['timeout s per round']:.0f} s; the server's resident memory after each round shows "
        "whether it keeps growing.",
        "",
        "## Results (all rounds)",
        "",
        markdown_table(
            ["measure", "value"],
            [
                ["requests sent / planned", f"{results['sent']} / {results['planned']}"],
                ["served correctly", results["served correctly"]],
                ["errors", ", ".join(f"{k}: {v}" for k, v in results["errors"].items()) or "none"],
                ["latency p50 / p90 / p99 / max (s)", " / ".join(fmt(lat, k) for k in ("p50", "p90", "p99", "max"))],
                ["throughput (requests/s)", f"{results['throughput req/s']:.2f}"],
                ["served correctly while the inversion ran", results["served during the inversion"]],
                [
                    "latency during the inversion p50 / p90 / max (s)",
                    " / ".join(fmt(dur, k) for k in ("p50", "p90", "max")),
                ],
                *[
                    [
                        f"inversion {i}: time (s) / previews streamed",
                        f"{inv['seconds']:.1f} / {inv['previews']}"
                        if inv["seconds"]
                        else f"not finished ({inv['error']})",
                    ]
                    for i, inv in enumerate(invs, 1)
                ],
                *[
                    [f"inversion {i}: final status", inv["status"].replace("|", "/") or inv["error"]]
                    for i, inv in enumerate(invs, 1)
                ],
                ["server log: errors or tracebacks", len(results["server log errors"])],
            ],
        ),
        "",
        "## Server memory (resident set)",
        "",
        markdown_table(["when", "MB"], [[k, f"{v / 1024:.0f}"] for k, v in mem.items()]),
        "",
        "## Raw",
        "",
        "```json",
        json.dumps(results, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="concurrent prediction clients")
    parser.add_argument("--requests", type=int, default=15, help="few-shot requests per client")
    parser.add_argument("--steps", type=int, default=400, help="steps of the one inversion")
    parser.add_argument("--rounds", type=int, default=2, help="load rounds, one after the other")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of each round, s")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = run(args)
    text = _markdown(results, environment(["gradio", "gradio_client", "timm"]), started)
    sys.stdout.write(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
