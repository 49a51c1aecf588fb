"""Test helper: render an HTML file to PNG with headless Chromium, and read the PNG's pixels back
(a small decoder: 8-bit RGB/RGBA, non-interlaced, filter types 0-4) so tests can assert on what a
person would see. No dependency beyond numpy; a missing Chromium fails the test with the fix."""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def require_chromium() -> str:
    """The Chromium executable; fails the calling test (not a skip: CI installs it) when missing."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"headless Chromium is needed at {CHROMIUM} to render the reports: "
                    "apt-get install -y chromium")
    return CHROMIUM


def render_png(html_path: Path, png_path: Path, *, width: int = 1280, height: int = 2000,
               timeout: int = 60) -> Path:
    """Screenshot `html_path` (a viewport of width x height) into `png_path` with a fresh profile."""
    exe = require_chromium()
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png_path}", html_path.as_uri()]
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"chromium did not render {html_path} within {timeout} s") from None
    if done.returncode != 0 or not png_path.is_file():
        raise AssertionError(f"chromium failed (exit {done.returncode}) rendering {html_path}: "
                             f"{done.stderr[-2000:]}")
    return png_path


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def decode_png(png_path: Path) -> np.ndarray:
    """The image as a (height, width, 3) uint8 RGB array (alpha dropped)."""
    data = Path(png_path).read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError(f"{png_path} is not a PNG")
    pos, header, idat = 8, None, bytearray()
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, chunk = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError(f"{png_path} has no IHDR chunk")
    width, height, depth, colour_type, _, _, interlace = header
    if depth != 8 or colour_type not in (2, 6) or interlace:
        raise ValueError(f"{png_path}: only 8-bit RGB/RGBA non-interlaced PNGs are supported, got "
                         f"depth={depth} colour_type={colour_type} interlace={interlace}")
    bpp = 3 if colour_type == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(bytes(idat)), dtype=np.uint8)
    if raw.size != height * (stride + 1):
        raise ValueError(f"{png_path}: {raw.size} bytes of image data, expected {height * (stride + 1)}")
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 1:  # Sub: a running sum per channel, mod 256
            sums = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint64)
            cur = (sums % 256).astype(np.uint8).ravel()
        elif kind == 2:  # Up
            cur = line + prev
        elif kind in (3, 4):  # Average, Paeth: each byte depends on the decoded one to its left
            row, up = bytearray(line.tobytes()), prev.tobytes()
            for i in range(stride):
                a = row[i - bpp] if i >= bpp else 0
                if kind == 3:
                    row[i] = (row[i] + ((a + up[i]) >> 1)) & 0xFF
                else:
                    row[i] = (row[i] + _paeth(a, up[i], up[i - bpp] if i >= bpp else 0)) & 0xFF
            cur = np.frombuffer(bytes(row), dtype=np.uint8)
        else:
            raise ValueError(f"{png_path}: row {y} has unknown filter type {kind}")
        out[y] = cur
        prev = cur
    return out.reshape(height, width, bpp)[:, :, :3]


def hex_rgb(colour: str) -> tuple[int, int, int]:
    """'#d93025' -> (217, 48, 37)."""
    colour = colour.lstrip("#")
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)


def colour_share(png_path: Path | np.ndarray, rgb: tuple[int, int, int] | str, tol: int = 12) -> float:
    """The share of pixels within `tol` (per channel) of the colour `rgb` (a tuple or '#rrggbb')."""
    pixels = decode_png(png_path) if not isinstance(png_path, np.ndarray) else png_path
    target = np.array(hex_rgb(rgb) if isinstance(rgb, str) else rgb, dtype=np.int16)
    close = np.all(np.abs(pixels.astype(np.int16) - target) <= tol, axis=2)
    return float(close.mean())


def used_height(pixels: np.ndarray, background: tuple[int, int, int] | None = None, tol: int = 3) -> int:
    """1 + the last row with a pixel that is not the background (by default the bottom-left pixel)."""
    bg = np.array(background if background is not None else pixels[-1, 0], dtype=np.int16)
    differs = np.any(np.abs(pixels.astype(np.int16) - bg) > tol, axis=(1, 2))
    rows = np.nonzero(differs)[0]
    return int(rows[-1]) + 1 if rows.size else 0
