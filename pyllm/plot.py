"""PNG line plots with numpy + zlib only: `line_plot("loss.png", {"train": (steps, losses), "val": (s, v)})`.

Axes carry their min/max values in a built-in 3x5 bitmap font; series names and colours go into a sidecar
`<name>.png.txt` legend (no font for letters, by design: keeps this file small).
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np

# 3x5 glyphs, rows top to bottom, 3 bits per row (MSB = left column).
_FONT = {"0": "75557", "1": "26227", "2": "71747", "3": "71717", "4": "55711", "5": "74717", "6": "74757",
         "7": "71111", "8": "75757", "9": "75717", ".": "00002", "-": "00700", "e": "02764", "+": "02720",
         " ": "00000"}
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def write_png(path: str, img: np.ndarray) -> None:
    """img (H, W, 3) uint8 -> PNG file, written atomically (tmp + rename)."""
    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def _text(img: np.ndarray, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 2) -> None:
    """Draw s with its top-left at (x, y); unknown characters are skipped."""
    for ch in s:
        g = _FONT.get(ch)
        if g is not None:
            for r, bits in enumerate(g):
                for c in range(3):
                    if int(bits) >> (2 - c) & 1:
                        y0, x0 = y + r * scale, x + c * scale
                        img[max(0, y0):y0 + scale, max(0, x0):x0 + scale] = color
        x += 4 * scale


def _label(v: float) -> str:
    return f"{v:.4g}".replace("e+0", "e").replace("e-0", "e-")


def _line(img: np.ndarray, x0, y0, x1, y1, color) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.clip(np.round(np.linspace(x0, x1, n)).astype(int), 0, img.shape[1] - 1)
    ys = np.clip(np.round(np.linspace(y0, y1, n)).astype(int), 0, img.shape[0] - 1)
    img[ys, xs] = color
    img[np.clip(ys + 1, 0, img.shape[0] - 1), xs] = color  # 2 px thick: readable when scaled down


def line_plot(path: str, series: dict, width: int = 800, height: int = 500, logy: bool = False) -> None:
    """series: name -> ys or (xs, ys). Writes the PNG and `<path>.txt` (legend: colour, name, n, last, min)."""
    data = []
    for name, s in series.items():
        xs, ys = s if isinstance(s, tuple) else (np.arange(len(s)), s)
        xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        ok = np.isfinite(xs) & np.isfinite(ys) & ((ys > 0) if logy else True)
        data.append((name, xs[ok], ys[ok]))
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 90, 20, 20, 40
    pw, ph = width - left - right, height - top - bottom
    allx = np.concatenate([d[1] for d in data] + [np.zeros(0)])
    ally = np.concatenate([d[2] for d in data] + [np.zeros(0)])
    ty = np.log10(ally) if logy else ally
    if allx.size:
        xlo, xhi, ylo, yhi = allx.min(), allx.max(), ty.min(), ty.max()
    else:
        xlo, xhi, ylo, yhi = 0.0, 1.0, 0.0, 1.0
    xhi, yhi = (xhi if xhi > xlo else xlo + 1), (yhi if yhi > ylo else ylo + 1)
    # axes, tick marks at the ends and quarters, min/max labels
    for f in (0, 0.25, 0.5, 0.75, 1.0):
        img[top + ph:top + ph + 6, left + int(f * pw)] = 0
        img[top + int(f * ph), left - 6:left] = 0
        img[top:top + ph, left + int(f * pw)][::4] = 200  # dotted grid
        img[top + int(f * ph), left:left + pw][::4] = 200
    img[top + ph, left:left + pw + 1] = 0
    img[top:top + ph + 1, left] = 0
    ylab = (lambda v: _label(10 ** v)) if logy else _label
    _text(img, 4, top + ph - 10, ylab(ylo))
    _text(img, 4, top, ylab(yhi))
    _text(img, left, top + ph + 12, _label(xlo))
    s = _label(xhi)
    _text(img, left + pw - 8 * len(s), top + ph + 12, s)
    legend = []
    for i, (name, xs, ys) in enumerate(data):
        c = COLORS[i % len(COLORS)]
        if xs.size:
            tys = np.log10(ys) if logy else ys
            px = left + (xs - xlo) / (xhi - xlo) * pw
            py = top + ph - (tys - ylo) / (yhi - ylo) * ph
            if xs.size == 1:
                img[int(py[0]) - 2:int(py[0]) + 3, int(px[0]) - 2:int(px[0]) + 3] = c
            for j in range(xs.size - 1):
                _line(img, px[j], py[j], px[j + 1], py[j + 1], c)
        img[6:14, left + 10 + 20 * i:left + 24 + 20 * i] = c  # colour swatch, in legend order
        last = f"{ys[-1]:.4g}" if ys.size else "-"
        mn = f"{ys.min():.4g}" if ys.size else "-"
        legend.append(f"#{c[0]:02x}{c[1]:02x}{c[2]:02x} {name} n={ys.size} last={last} min={mn}")
    write_png(path, img)
    tmp = path + ".txt.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.path.basename(path)}: x {_label(xlo)}..{_label(xhi)}, y {ylab(ylo)}..{ylab(yhi)}"
                f"{' (log)' if logy else ''}\n" + "\n".join(legend) + "\n")
    os.replace(tmp, path + ".txt")
