"""An HTTP server that misbehaves on purpose, for the fault tests and the benchmark: it
serves a directory on 127.0.0.1 (with ``Range`` requests) and cuts responses mid-body,
answers 503 Slow Down, and stalls once past a client's read timeout, by a fixed-seed draw.

    python -m fastmnist.bench.faulty_server DIRECTORY PORT [--cut 0.2] [--unavailable 0.1] [--stall-s 1.5]
"""

import argparse
import http.server
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path


class Faults:
    """What the server does to each request: a fixed-seed draw of 20% cut mid-body and 10%
    503, one stall longer than the client's read timeout, ``broken`` paths that always
    answer 503, and ``cut_once`` paths whose next response is cut. Counts what it injected,
    the ranges it was asked for and the bytes it sent."""

    def __init__(self, seed=0, cut=0.2, unavailable=0.1, stall_s=1.5):
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.cut, self.unavailable, self.stall_s = cut, unavailable, stall_s
        self.stalled, self.broken, self.cut_once = False, set(), set()
        self.injected, self.requests, self.ranges, self.sent = Counter(), Counter(), [], Counter()

    def decide(self, path: str) -> str:
        with self.lock:
            if path in self.broken:
                fault = "503"
            elif path in self.cut_once:
                self.cut_once.discard(path)
                fault = "cut"
            elif not self.stalled and path.endswith(".tar"):
                self.stalled, fault = True, "stall"
            else:
                draw = self.rng.random()
                fault = "cut" if draw < self.cut else "503" if draw < self.cut + self.unavailable else "ok"
            if fault != "ok":
                self.injected[fault] += 1
            return fault


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        faults, root = self.server.faults, self.server.root
        with faults.lock:
            faults.requests[self.path] += 1
        path = (root / self.path.lstrip("/")).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            self.send_error(404)
            return
        fault = faults.decide(self.path)
        if fault == "503":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        start = int(m.group(1)) if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))) else 0
        if start:
            faults.ranges.append((self.path, start))
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        try:
            if fault == "stall":
                time.sleep(faults.stall_s)
            sent = body[: len(body) // 2] if fault == "cut" else body
            with faults.lock:  # counted first: the client may have it all before write returns
                faults.sent[self.path] += len(sent)
            self.wfile.write(sent)
        except OSError:  # the client gave up on a stalled response
            pass
        self.close_connection = fault != "ok"

    def log_message(self, *args):
        pass


def serve(directory: Path, faults: Faults, port: int = 0) -> http.server.ThreadingHTTPServer:
    """Start serving ``directory`` with ``faults`` on 127.0.0.1:``port`` (0: any) in a
    daemon thread; the server's ``server_address`` gives the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), FaultyHandler)
    server.faults, server.root = faults, Path(directory).resolve()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path)
    p.add_argument("port", type=int)
    p.add_argument("--cut", type=float, default=0.2)
    p.add_argument("--unavailable", type=float, default=0.1)
    p.add_argument("--stall-s", type=float, default=1.5)
    args = p.parse_args()
    serve(args.directory, Faults(cut=args.cut, unavailable=args.unavailable, stall_s=args.stall_s), args.port)
    threading.Event().wait()


if __name__ == "__main__":
    main()
