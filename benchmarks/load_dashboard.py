"""Load test: N concurrent browser sessions upload photos and move the threshold against one `streamlit run`.

    python benchmarks/load_dashboard.py [--sessions 20] [--seconds 60] [--images DIR] [--url URL [--server-pid PID]]

Each session (its own Chromium context, so its own Streamlit session) loops: on Predict, upload a photo and wait for
its probability; on the Threshold explorer, click a preset and wait for the script run to end. A response time is
from the action to the result on screen. The server's resident memory is sampled every 2 s: a Grad-CAM hook or
tensor leak shows as growth while the load is steady. Prints a JSON summary; exits 1 if any session saw an error.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

from playwright.async_api import async_playwright

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--renderer-process-limit=4"]
RUNNING = "() => !document.querySelector('[data-testid=stStatusWidget]')"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far: what the server itself spent, apart from the browsers."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log: IO | int = subprocess.DEVNULL, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`streamlit run dashboard/app.py` (what `make dashboard` runs) on localhost:``port``, returned once it answers
    its health check; the test suite starts its server here too. Output goes to ``log``."""
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port",
                               str(port), "--server.address", "127.0.0.1"], cwd=PROJECT_ROOT, stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 90
    while server.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).close()
            return server
        except OSError:
            time.sleep(0.5)
    why = f"exited with code {server.returncode}" if server.poll() is not None else "did not answer within 90 s"
    server.terminate()
    server.wait(timeout=30)
    raise RuntimeError(f"streamlit {why} (port {port})")


async def settle(page) -> None:
    await page.wait_for_timeout(200)
    await page.wait_for_function(RUNNING, timeout=120_000)


async def session(browser, url: str, images: list[Path], stop_at: float, seed: int, record: dict) -> None:
    rng = random.Random(seed)
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    page.set_default_timeout(120_000)
    try:
        while time.monotonic() < stop_at:
            await page.goto(url)
            await settle(page)
            start = time.monotonic()
            await page.locator("input[type=file]").set_input_files(str(rng.choice(images)))
            await page.locator("[data-testid=stMetricValue]").first.wait_for()
            record["upload"].append(time.monotonic() - start)

            await page.goto(f"{url}/threshold")
            await settle(page)
            for _ in range(3):
                preset = page.locator("[data-testid=stButton] button").nth(rng.randrange(3))
                start = time.monotonic()
                await preset.click()
                await settle(page)
                record["threshold"].append(time.monotonic() - start)
            if await page.locator("[data-testid=stException]").count():
                record["errors"].append(await page.locator("[data-testid=stException]").first.inner_text())
    except Exception as err:  # noqa: BLE001 — a load test reports every failure, whatever it is
        record["errors"].append(f"session {seed}: {type(err).__name__}: {err}")
    finally:
        await context.close()


async def run(args: argparse.Namespace, url: str, server_pid: int | None) -> dict:
    images = sorted(Path(args.images).glob("*.jpg"))[:200]
    if not images:
        raise SystemExit(f"no .jpg images in {args.images}")
    record: dict = {"upload": [], "threshold": [], "errors": []}
    memory: list[tuple[float, float]] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        begin = time.monotonic()
        stop_at = begin + args.seconds

        async def sample() -> None:
            while time.monotonic() < stop_at + 5 and server_pid:
                memory.append((time.monotonic() - begin, rss_mb(server_pid)))
                await asyncio.sleep(2)

        sampler = asyncio.create_task(sample())
        cpu_before = cpu_seconds(server_pid) if server_pid else float("nan")
        await asyncio.gather(*(session(browser, url, images, stop_at, k, record) for k in range(args.sessions)))
        cpu_used = (cpu_seconds(server_pid) if server_pid else float("nan")) - cpu_before
        wall = time.monotonic() - begin
        sampler.cancel()
        await browser.close()

    def summary(times: list[float]) -> dict:
        if not times:
            return {"n": 0}
        ordered = sorted(times)
        return {"n": len(times), "median_s": round(statistics.median(times), 3),
                "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
                "max_s": round(ordered[-1], 3)}

    # Memory after the first third (model loaded, caches warm) vs the end: steady load must not keep growing.
    warm = [m for t, m in memory if t >= args.seconds / 3]
    return {"sessions": args.sessions, "seconds": args.seconds, "upload": summary(record["upload"]),
            "threshold_preset": summary(record["threshold"]), "errors": record["errors"][:10],
            "n_errors": len(record["errors"]), "wall_s": round(wall, 1),
            "server_cpu_s": round(cpu_used, 1),
            "server_cpu_per_action_ms": round(
                1000 * cpu_used / max(1, len(record["upload"]) + len(record["threshold"])), 1),
            "server_rss_mb": {"first": round(memory[0][1], 1) if memory else None,
                              "after_warmup": round(warm[0], 1) if warm else None,
                              "last": round(memory[-1][1], 1) if memory else None,
                              "max": round(max(m for _, m in memory), 1) if memory else None,
                              "every_10_s": [round(m) for t, m in memory[::5]]}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--images", default=str(PROJECT_ROOT.parent / "shared" / "data" / "ham10000" / "images"))
    parser.add_argument("--url", help="an already running dashboard (its memory is sampled only with --server-pid)")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's process id, for memory and CPU")
    args = parser.parse_args(argv)
    if args.server_pid and not args.url:
        parser.error("--server-pid needs --url (without it the script starts, and measures, its own server)")
    server = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        port = free_port()
        server = start_server(port)
        url = f"http://127.0.0.1:{port}"
    try:
        result = asyncio.run(run(args, url, server.pid if server else args.server_pid))
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps(result, indent=1))
    sys.exit(1 if result["n_errors"] else 0)


if __name__ == "__main__":
    main()
