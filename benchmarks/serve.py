"""Serving benchmark: latency and throughput of `python cli.py serve`, and Run.predict_proba on raw posts.

    python benchmarks/serve.py --run runs/default --json results/serve.json

Starts the server on a loopback port (a child process, as a user would), warms it, then:
one client sending posts one after another (single-post latency; then a fifth as many with
explanations, as the web page asks for them), and ``--clients`` clients
sending ``--requests`` posts between them (throughput under load); every response must be a 200.
Then, in this process, ``Run.predict_proba`` on ``--posts`` raw posts in batches (posts/s), and
what reading the text in an image adds per post to a "+ocr" run (rapidocr at the default settings).
The posts are the data folder's pairs, test split first (texts and JPEG bytes read once, before timing).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import defaults  # noqa: E402
from extract.dataset import image_path, load_image, read_split, read_text  # noqa: E402

Post = tuple[str, bytes]  # text, JPEG bytes


def read_posts(data: Path, count: int) -> list[Post]:
    """The first ``count`` pairs of the test split, then of the train split."""
    guids = [row.guid for split in ("test", "train") for row in read_split(data, split)][:count]
    return [(read_text(data, guid), image_path(data, guid).read_bytes()) for guid in guids]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run: Path, port: int, data: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "cli.py", "serve", "--run", str(run), "--port", str(port), "--data", str(data)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"serve exited: {server.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("serve did not answer /health within 300 s")


def send(client: httpx.Client, url: str, post: Post, explain: bool = False) -> tuple[float, int]:
    started = time.perf_counter()
    response = client.post(url, data={"text": post[0], "explain": str(explain).lower()},
                           files={"image": ("post.jpg", post[1], "image/jpeg")})
    return time.perf_counter() - started, response.status_code


def latency_row(name: str, seconds: list[float], codes: list[int], wall: float) -> dict[str, object]:
    ms = np.array(seconds) * 1000
    return {
        "load": name, "requests": len(seconds), "requests/s": f"{len(seconds) / wall:.1f}",
        "p50 ms": f"{np.percentile(ms, 50):.0f}", "p95 ms": f"{np.percentile(ms, 95):.0f}",
        "errors": sum(code != 200 for code in codes),
    }


def bench_server(run: Path, data: Path, posts: list[Post], sequential: int, requests: int, clients: int) -> list:
    port = free_port()
    url = f"http://127.0.0.1:{port}/predict"
    started = time.perf_counter()
    server = start_server(run, port, data)
    ready = time.perf_counter() - started
    try:
        with httpx.Client(timeout=60) as client:
            for post in posts[:5]:
                send(client, url, post)  # warm: first calls allocate
            began = time.perf_counter()
            one = [send(client, url, posts[i % len(posts)]) for i in range(sequential)]
            rows = [latency_row("1 client, one post at a time", *zip(*one), time.perf_counter() - began)]
            began = time.perf_counter()
            why = [send(client, url, posts[i % len(posts)], explain=True) for i in range(max(sequential // 5, 1))]
            rows.append(latency_row("1 client, explain=true", *zip(*why), time.perf_counter() - began))

        def worker(k: int) -> list[tuple[float, int]]:
            with httpx.Client(timeout=120) as client:
                return [send(client, url, posts[i % len(posts)]) for i in range(k, requests, clients)]

        began = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = [pair for part in pool.map(worker, range(clients)) for pair in part]
        rows.append(latency_row(f"{clients} concurrent clients", *zip(*results), time.perf_counter() - began))
    finally:
        server.terminate()
        server.wait(30)
    for row in rows:
        row["server start s"] = f"{ready:.1f}"
    return rows


def bench_api(run: Path, data: Path, posts: list[Post], batch_size: int) -> dict[str, object]:
    from fusion.api import Post as ApiPost
    from fusion.api import Run

    loaded = Run.load(run, data_dir=data)
    batch = [ApiPost(text, image) for text, image in posts]
    loaded.predict_proba(batch[:batch_size], batch_size)  # builds the encoders
    started = time.perf_counter()
    loaded.predict_proba(batch, batch_size)
    seconds = time.perf_counter() - started
    return {"posts": len(batch), "batch size": batch_size, "seconds": f"{seconds:.1f}",
            "posts/s": f"{len(batch) / seconds:.1f}"}


def bench_ocr(data: Path, count: int) -> dict[str, object]:
    import io

    from extract.ocr import OCR_SETTINGS, OcrReader

    reader = OcrReader(OCR_SETTINGS)
    pictures = [load_image(io.BytesIO(image)) for _, image in read_posts(data, count)]
    reader(pictures[0])  # loads the models
    started = time.perf_counter()
    for picture in pictures:
        reader(picture)
    seconds = (time.perf_counter() - started) / len(pictures)
    return {"images": len(pictures), "settings": OCR_SETTINGS.tag, "ms per image": f"{seconds * 1000:.0f}"}


def markdown(rows: list[dict[str, object]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=defaults.RUN_DIR)
    parser.add_argument("--data", type=Path, default=defaults.DATA_DIR)
    parser.add_argument("--sequential", type=int, default=100, help="requests of the one-client row")
    parser.add_argument("--requests", type=int, default=300, help="requests of the concurrent row")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--posts", type=int, default=512, help="raw posts of the Run.predict_proba row (0 skips)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ocr-images", type=int, default=50, help="images of the OCR row (0 skips)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    posts = read_posts(args.data, max(args.posts, 64))
    results: dict[str, object] = {"run": str(args.run), "cpus": os.cpu_count()}
    results["server"] = bench_server(args.run, args.data, posts[:64], args.sequential, args.requests, args.clients)
    print(f"## serve --run {args.run} (loopback, warm)\n\n{markdown(results['server'])}\n")
    if args.posts:
        results["api"] = bench_api(args.run, args.data, posts[: args.posts], args.batch_size)
        print(f"## Run.predict_proba on raw posts\n\n{markdown([results['api']])}\n")
    if args.ocr_images:
        results["ocr"] = bench_ocr(args.data, args.ocr_images)
        print(f"## What +ocr adds per post (rapidocr, one image at a time)\n\n{markdown([results['ocr']])}\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
