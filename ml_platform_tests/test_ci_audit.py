"""`.ci/audit_pypi.py`, the audit CI falls back to where pip-audit cannot ask: against a real HTTP
server on loopback that answers PyPI's project JSON for three installed packages, it fails on a
known vulnerability of a package at its latest release (naming id, aliases and fix), ignores a
withdrawn one, and names what it could not audit (an older release installed, no answer)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "audit_pypi.py"
PACKAGES = ("duckdb", "pyarrow", "redis", "scipy")  # installed with the platform


def project(name: str, latest: str, vulnerabilities: list[dict]) -> dict:
    return {"info": {"name": name, "version": latest}, "vulnerabilities": vulnerabilities}


@pytest.fixture()
def index():
    """A loopback server answering /pypi/<name>/json from `answers` (404 for the others)."""
    answers: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.strip("/").split("/")[1]
            body = answers.get(name)
            self.send_response(200 if body else 404)
            self.end_headers()
            if body:
                self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/pypi", answers
    server.shutdown()
    server.server_close()


def run_audit(url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--index", url, "--only", *PACKAGES],
        check=False, capture_output=True, text=True, timeout=120,
    )


def test_a_vulnerable_latest_release_fails_the_audit_and_what_was_not_audited_is_named(index):
    url, answers = index
    v = {name: metadata.version(name) for name in PACKAGES}
    answers["duckdb"] = project("duckdb", v["duckdb"], [])
    answers["pyarrow"] = project("pyarrow", v["pyarrow"], [
        {"id": "PYSEC-0000-1", "aliases": ["CVE-0000-1"], "fixed_in": ["999.0"], "summary": "Heap overflow in IPC reader",
         "withdrawn": None},
        {"id": "PYSEC-0000-2", "aliases": [], "fixed_in": [], "summary": "retracted", "withdrawn": "2026-01-01T00:00:00"},
    ])
    answers["redis"] = project("redis", "999.0", [])  # an older release installed: not auditable here
    # scipy: no answer (404)
    out = run_audit(url)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"pyarrow {v['pyarrow']}: PYSEC-0000-1 (CVE-0000-1), fixed in 999.0: Heap overflow in IPC reader" in out.stdout
    assert "PYSEC-0000-2" not in out.stdout  # withdrawn
    assert f"redis {v['redis']} (latest release 999.0)" in out.stdout
    assert f"scipy {v['scipy']}: no answer from {url}/scipy/json" in out.stdout
    assert "2 of 4 installed packages audited (installed = latest release), 1 with known vulnerabilities" in out.stdout


def test_no_known_vulnerability_passes_and_nothing_audited_is_not_a_pass(index):
    url, answers = index
    for name in PACKAGES:
        answers[name] = project(name, metadata.version(name), [])
    out = run_audit(url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 of 4 installed packages audited (installed = latest release), 0 with known vulnerabilities" in out.stdout
    answers.clear()  # the service answers nothing: exit 2, never a quiet pass
    out = run_audit(url)
    assert out.returncode == 2 and "0 of 4 installed packages audited" in out.stdout
