"""HTTP API benchmark: /predict latency at a fixed request rate and its throughput ceiling, against
baselines measured in the same run (the same endpoint with the scikit-learn scorer forced, and a
bare GET /health).

    .venv/bin/python bench/http_api.py [--rate 300] [--duration 60] [--quick]

Builds a platform in a temp dir (generated events, two registered models: v2 with 200 trees over
the 32 model inputs; the online store in the Redis on 127.0.0.1:6379 under a `bench_http_<hex>`
prefix, deleted afterwards), then for each case starts `run_server` in a subprocess (1 uvicorn
worker) and measures
  * fixed rate: an open-loop load generator in its own process (aiohttp) sends `--rate` requests/s
    for `--duration` s, each one at its scheduled time whatever the server does; latency is taken
    from the scheduled send time (no coordinated omission); errors = non-2xx + timeouts (10 s);
  * ceiling: closed-loop `wrk` (Debian's package; 1 thread, 32 connections, Lua script rotating
    over 2000 real card-holder/merchant pairs) for `--ceiling-duration` s; if wrk is missing, the
    Python generator in closed-loop mode.
Bodies rotate over real entities so every request reads real features from Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ml_platform_tests"))


# --------------------------------------------------------------------------- load generator


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


async def _fixed_rate(url: str, bodies: list[bytes], rate: float, duration: float, timeout: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=512)
    method = "GET" if not bodies else "POST"
    headers = {"Content-Type": "application/json"}
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def one(i: int, scheduled: float) -> None:
            try:
                async with session.request(
                    method, url, data=bodies[i % len(bodies)] if bodies else None, headers=headers
                ) as resp:
                    await resp.read()
                    if resp.status >= 300:
                        errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
                        return
            except Exception as exc:  # noqa: BLE001 - counted, reported
                key = type(exc).__name__
                errors[key] = errors.get(key, 0) + 1
                return
            latencies.append((time.perf_counter() - scheduled) * 1000.0)

        n = int(rate * duration)
        # perf_counter, not loop.time(): uvloop's clock has millisecond resolution
        start = time.perf_counter() + 0.05
        tasks = []
        for i in range(n):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        sent_for = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return {
        "requests": n,
        "ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "offered_rps": n / sent_for if sent_for > 0 else float("nan"),
        "p50_ms": _percentile(latencies, 50),
        "p90_ms": _percentile(latencies, 90),
        "p99_ms": _percentile(latencies, 99),
        "max_ms": max(latencies) if latencies else float("nan"),
    }


async def _closed_loop(url: str, bodies: list[bytes], connections: int, duration: float) -> dict:
    import aiohttp

    loop = asyncio.get_running_loop()
    done = 0
    errors = 0
    latencies: list[float] = []
    deadline = loop.time() + duration
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:

        async def worker(k: int) -> None:
            nonlocal done, errors
            i = k
            while loop.time() < deadline:
                t = time.perf_counter()
                try:
                    request = (
                        session.post(
                            url, data=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}
                        )
                        if bodies
                        else session.get(url)  # no bodies: GET (the bare /health baseline)
                    )
                    async with request as resp:
                        await resp.read()
                        ok = resp.status < 300
                except Exception:  # noqa: BLE001
                    ok = False
                done += ok
                errors += not ok
                latencies.append((time.perf_counter() - t) * 1000)
                i += connections

        started = loop.time()
        await asyncio.gather(*(worker(k) for k in range(connections)))
        took = loop.time() - started
    return {
        "rps": done / took,
        "errors": errors,
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "tool": "python closed loop",
    }


def loadgen_main(argv: list[str]) -> None:
    """`--loadgen MODE URL BODIES_FILE ...`: run in a separate process, print one JSON line."""
    mode, url, bodies_file = argv[:3]
    bodies = (
        [line.encode() for line in Path(bodies_file).read_text().splitlines() if line]
        if bodies_file != "-"
        else []
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if mode == "fixed":
        rate, duration, timeout = float(argv[3]), float(argv[4]), float(argv[5])
        result = asyncio.run(_fixed_rate(url, bodies, rate, duration, timeout))
    else:
        connections, duration = int(argv[3]), float(argv[4])
        result = asyncio.run(_closed_loop(url, bodies, connections, duration))
    print(json.dumps(result))


def run_loadgen(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--loadgen", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


WRK_LUA = """
local bodies = {}
for line in io.lines("%s") do bodies[#bodies + 1] = line end
local i = 0
wrk.method = "%s"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  if #bodies == 0 then return wrk.format(nil) end
  return wrk.format(nil, nil, nil, bodies[(i %% #bodies) + 1])
end
"""


def ceiling(url: str, bodies_file: Path, method: str, duration: float, connections: int, tmp: Path) -> dict:
    """Requests/s with `connections` requests always in flight (closed loop)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return run_loadgen(
            "closed", url, str(bodies_file) if method == "POST" else "-", str(connections), str(duration)
        )
    script = tmp / f"wrk_{method.lower()}.lua"
    script.write_text(WRK_LUA % (bodies_file if method == "POST" else "/dev/null", method))
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{int(duration)}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)

    def pct(label: str) -> float:
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {
        "rps": rps,
        "errors": errors,
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "tool": f"wrk -t1 -c{connections}",
    }


# --------------------------------------------------------------------------- the benchmark


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=300.0, help="fixed request rate (requests/s)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds at the fixed rate")
    parser.add_argument("--ceiling-duration", type=float, default=15.0, help="seconds of the closed-loop run")
    parser.add_argument("--connections", type=int, default=32, help="closed-loop connections")
    parser.add_argument(
        "--quick", action="store_true", help="10 s runs and a smaller platform (a smoke test)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.ceiling_duration = 10.0, 5.0

    from fixtures_platform import ServerProcess, build_tiny_platform

    tmp = Path(tempfile.mkdtemp(prefix="bench_http_"))
    print(f"building the platform in {tmp} ...", flush=True)
    started = time.perf_counter()
    config = {"n_users": 2000, "n_merchants": 300, "days": 30} if not args.quick else None
    platform = build_tiny_platform(
        tmp / "platform",
        project=f"bench_http_{os.getpid()}",
        config=config,
        v2_params=None if args.quick else {"max_iter": 200},
    )
    print(
        f"  ready in {time.perf_counter() - started:.0f} s: {len(platform.events)} events, "
        f"champion v2 ({'40' if args.quick else '200'} trees), timings {platform.timings}",
        flush=True,
    )
    pairs = (
        platform.events[["user_id", "merchant_id"]]
        .drop_duplicates()
        .sample(n=min(2000, len(platform.events)), random_state=0)
    )
    rng = random.Random(0)
    now = datetime.now(UTC).isoformat()
    bodies = []
    for k, (user_id, merchant_id) in enumerate(pairs.itertuples(index=False)):
        bodies.append(
            json.dumps(
                {
                    "transaction_id": f"bench-{k}",
                    "user_id": int(user_id),
                    "merchant_id": int(merchant_id),
                    "merchant_category": rng.choice(
                        ["grocery", "electronics", "travel", "fuel", "gift_cards"]
                    ),
                    "amount": round(rng.lognormvariate(3.5, 1.0), 2),
                    "country": rng.choice(["DE", "FR", "US", "GB"]),
                    "device": rng.choice(["ios", "android", "desktop"]),
                    "channel": rng.choice(["online", "pos"]),
                    "event_timestamp": now,
                }
            )
        )
    bodies_file = tmp / "bodies.jsonl"
    bodies_file.write_text("\n".join(bodies) + "\n")

    results = {}
    cases = [
        ("predict (fast path)", "/predict", "POST", {"scorer": "auto"}),
        ("predict (scikit-learn forced)", "/predict", "POST", {"scorer": "sklearn"}),
        ("bare GET /health", "/health", "GET", {"scorer": "auto"}),
    ]
    try:
        for name, path, method, cfg in cases:
            server = ServerProcess(platform.settings, log_path=tmp / f"server_{len(results)}.log", **cfg)
            with server:
                url = server.url + path
                # warm-up: connections, first reads, code paths
                run_loadgen("fixed", url, str(bodies_file) if method == "POST" else "-", "100", "2", "10")
                print(f"\n[{name}] fixed rate {args.rate:.0f}/s for {args.duration:.0f} s ...", flush=True)
                cpu_before, load_before = server_cpu_s(server.proc.pid), os.getloadavg()[0]
                fixed = run_loadgen(
                    "fixed",
                    url,
                    str(bodies_file) if method == "POST" else "-",
                    str(args.rate),
                    str(args.duration),
                    "10",
                )
                fixed["server_cpu_ms_per_request"] = (
                    (server_cpu_s(server.proc.pid) - cpu_before) * 1000 / fixed["requests"]
                )
                fixed["loadavg"] = (load_before, os.getloadavg()[0])
                print(
                    f"  p50 {fixed['p50_ms']:.2f} ms  p99 {fixed['p99_ms']:.2f} ms  max {fixed['max_ms']:.1f} ms  "
                    f"errors {fixed['errors']} {fixed['error_kinds'] or ''} of {fixed['requests']}  "
                    f"server CPU {fixed['server_cpu_ms_per_request']:.2f} ms/request  "
                    f"load average {fixed['loadavg'][0]:.1f} -> {fixed['loadavg'][1]:.1f}",
                    flush=True,
                )
                top = ceiling(url, bodies_file, method, args.ceiling_duration, args.connections, tmp)
                print(
                    f"  ceiling {top['rps']:.0f} req/s ({top['tool']}, p50 {top['p50_ms']:.1f} ms, "
                    f"p99 {top['p99_ms']:.1f} ms, errors {top['errors']})",
                    flush=True,
                )
                import httpx

                model = httpx.get(server.url + "/model", timeout=5).json()
                metrics = httpx.get(server.url + "/metrics", timeout=5).text
                rows = re.search(r"ml_platform_scoring_batch_rows_sum ([\d.e+]+)", metrics)
                count = re.search(r"ml_platform_scoring_batch_rows_count ([\d.e+]+)", metrics)
                results[name] = {
                    "fixed": fixed,
                    "ceiling": top,
                    "scorer": (model.get("serving") or {}).get("features", "")
                    + "+"
                    + (model.get("serving") or {}).get("scorer", ""),
                    "mean_batch_rows": float(rows.group(1)) / float(count.group(1))
                    if rows and float(count.group(1))
                    else None,
                }
    finally:
        platform.cleanup()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    fast = results["predict (fast path)"]
    base = results["predict (scikit-learn forced)"]
    bare = results["bare GET /health"]
    print(
        f"\n=== {datetime.now(UTC):%Y-%m-%d} | {os.cpu_count()} CPUs | 1 uvicorn worker | "
        f"{args.rate:.0f} req/s for {args.duration:.0f} s | ceiling: {fast['ceiling']['tool']} "
        f"{args.ceiling_duration:.0f} s ==="
    )
    print(
        "| case | scorer | p50 ms | p99 ms | max ms | errors | server CPU ms/req | ceiling req/s | mean batch rows |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        f, c = r["fixed"], r["ceiling"]
        mb = f"{r['mean_batch_rows']:.1f}" if r["mean_batch_rows"] else "-"
        print(
            f"| {name} | {r['scorer'] if 'predict' in name else '-'} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | "
            f"{f['max_ms']:.1f} | {f['errors']}/{f['requests']} | {f['server_cpu_ms_per_request']:.2f} | "
            f"{c['rps']:.0f} | {mb} |"
        )
    loads = [x for r in results.values() for x in r["fixed"]["loadavg"]]
    print(
        f"load average during the fixed-rate runs: {min(loads):.1f} .. {max(loads):.1f} "
        f"(this benchmark alone adds ~1: server + load generator)"
    )
    print(
        f"\nfast path vs scikit-learn forced: p99 {base['fixed']['p99_ms'] / fast['fixed']['p99_ms']:.1f}x lower, "
        f"ceiling {fast['ceiling']['rps'] / base['ceiling']['rps']:.1f}x higher"
    )
    print(
        f"fast path vs bare /health: ceiling {fast['ceiling']['rps'] / bare['ceiling']['rps']:.2f}x, "
        f"p99 +{fast['fixed']['p99_ms'] - bare['fixed']['p99_ms']:.2f} ms"
    )
    goal = fast["fixed"]["p99_ms"] < 25 and fast["fixed"]["errors"] == 0 and fast["ceiling"]["rps"] >= 600
    print(
        f"goals (p99 < 25 ms at {args.rate:.0f}/s with 0 errors, ceiling >= 600/s): {'MET' if goal else 'NOT MET'}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--loadgen":
        loadgen_main(sys.argv[2:])
    else:
        main()
