"""Known vulnerabilities of the installed packages from PyPI's project JSON, where pip-audit cannot ask.

pip-audit asks `https://pypi.org/pypi/<name>/<version>/json` for every installed version. This
workplace's registry proxy answers only the project endpoint, `/pypi/<name>/json`, whose
`vulnerabilities` are those of the project's *latest* release (PyPI's JSON API; the data is the
same PyPA advisory database pip-audit reads). So this audits every installed package whose version
is its latest release (most of a fresh install), fails on any known vulnerability of one that is
not withdrawn, and names each package it could not audit and why (an older release installed:
what is known of that release is not served here; or no answer for the name).

    .venv/bin/python .ci/audit_pypi.py [--index https://pypi.org/pypi] [--only NAME ...]

Exit 0: no known vulnerability among the packages audited; 1: some (each listed with its id and
the versions that fix it); 2: no package could be audited at all.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata

from packaging.version import InvalidVersion, Version

ATTEMPTS = 4


def normalize(name: str) -> str:
    """A project name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(only: list[str] | None) -> dict[str, str]:
    """Installed distributions (name -> version), editable installs (the project itself) left out."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        direct = dist.read_text("direct_url.json") or ""
        if '"editable": true' in direct.replace("'", '"'):
            continue
        found[normalize(dist.metadata["Name"])] = dist.version
    if only:
        wanted = {normalize(n) for n in only}
        found = {n: v for n, v in found.items() if n in wanted}
    return dict(sorted(found.items()))


def same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def audit_one(index: str, name: str, version: str) -> tuple[str, list[str]]:
    """("ok" | "vulnerable" | "older" | "unanswered", details) for one installed package."""
    project = None
    for attempt in range(ATTEMPTS):  # a lookup or connection can fail once under 8 parallel asks
        try:
            with urllib.request.urlopen(f"{index}/{name}/json", timeout=60) as response:
                project = json.load(response)
            break
        except urllib.error.HTTPError as exc:  # an answer: the registry does not know the name
            return "unanswered", [f"{name} {version}: no answer from {index}/{name}/json ({exc})"]
        except (urllib.error.URLError, TimeoutError, ValueError) as exc:
            if attempt == ATTEMPTS - 1:
                return "unanswered", [f"{name} {version}: no answer from {index}/{name}/json ({exc})"]
            time.sleep(0.5 * 2**attempt)
    latest = str(project.get("info", {}).get("version", ""))
    if not same_version(version, latest):
        return "older", [f"{name} {version} (latest release {latest})"]
    found = [v for v in project.get("vulnerabilities") or [] if not v.get("withdrawn")]
    if not found:
        return "ok", []
    return "vulnerable", [
        f"{name} {version}: {v.get('id')}"
        f"{' (' + ', '.join(v.get('aliases') or []) + ')' if v.get('aliases') else ''}, "
        f"fixed in {', '.join(v.get('fixed_in') or []) or 'no release yet'}: {(v.get('summary') or v.get('details') or '').strip()[:160]}"
        for v in found
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="https://pypi.org/pypi", help="the JSON API's base URL")
    parser.add_argument("--only", nargs="+", help="audit only these installed packages")
    args = parser.parse_args(argv)
    packages = installed(args.only)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda item: (item[0], *audit_one(args.index, *item)), packages.items()))
    by_kind: dict[str, list[str]] = {"ok": [], "vulnerable": [], "older": [], "unanswered": []}
    lines: dict[str, list[str]] = {k: [] for k in by_kind}
    for name, kind, details in results:
        by_kind[kind].append(name)
        lines[kind] += details
    audited = len(by_kind["ok"]) + len(by_kind["vulnerable"])
    if lines["vulnerable"]:
        print("known vulnerabilities in the installed environment:")
        print("\n".join("  " + line for line in lines["vulnerable"]))
    not_audited = lines["older"] + lines["unanswered"]
    if not_audited:
        print(f"not audited ({len(not_audited)}: an older release installed, whose advisories this registry does not serve, or no answer):")
        print("\n".join("  " + line for line in not_audited))
    print(
        f"audit from PyPI's project JSON: {audited} of {len(packages)} installed packages audited "
        f"(installed = latest release), {len(by_kind['vulnerable'])} with known vulnerabilities"
    )
    if by_kind["vulnerable"]:
        return 1
    return 2 if audited == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
