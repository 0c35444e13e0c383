#!/usr/bin/env python3
"""Keep committed notebooks small.

    python .ci/nbsize.py nbs/*.ipynb           # shrink outputs in place, then report
    python .ci/nbsize.py --check nbs/*.ipynb   # fail if a limit is broken (CI)

Shrinking: one image format per figure (a JPEG or SVG copy of a PNG is dropped), no progress-bar HTML, and each PNG
re-encoded with few colours: 6 evenly spaced grey levels for a grey figure (black stays black, white stays white), an
adaptive palette of 32 colours otherwise (lossy, but hardly visible at a figure's size). Limits: each notebook
<= 400 KB, all together <= 2 MB.
"""
import base64, glob, io, json, sys
from pathlib import Path

MAX_ONE, MAX_ALL = 400 * 1024, 2 * 1024 * 1024

def _shrink_png(b: bytes) -> bytes:
    import numpy as np
    from PIL import Image
    im = Image.open(io.BytesIO(b)); a = np.asarray(im.convert('RGBA'))
    if (a[..., 3] != 255).any(): return b                      # transparency: leave it
    grey = (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    if grey:   # 0, 51, ..., 255: an adaptive palette could merge white strokes into a grey
        q = Image.frombytes('P', im.size, (a[..., 0].astype(np.float32) / 51).round().astype(np.uint8).tobytes())
        q.putpalette([v for level in range(0, 256, 51) for v in (level,) * 3])
    else: q = Image.fromarray(a[..., :3], 'RGB').quantize(32, dither=Image.Dither.NONE)
    buf = io.BytesIO(); q.save(buf, 'PNG', optimize=True, bits=4 if grey else 8)
    return buf.getvalue() if len(buf.getvalue()) < len(b) else b

def _is_progress(html: str) -> bool: return '<progress' in html or 'progress-bar' in html or not html.strip()   # empty: a closed bar

def shrink(fn):
    nb = json.loads(Path(fn).read_text())
    for c in nb['cells']:
        outs = []
        for o in c.get('outputs', []):
            d = o.get('data') or {}
            if 'text/html' in d and _is_progress(''.join(d['text/html'])): continue
            if 'image/png' in d:
                for k in ('image/jpeg', 'image/svg+xml'): d.pop(k, None)
                b = base64.b64decode(''.join(d['image/png']))
                s = _shrink_png(b)
                if s is not b: d['image/png'] = base64.b64encode(s).decode() + '\n'
            outs.append(o)
        if 'outputs' in c: c['outputs'] = outs
    Path(fn).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')

def report(fns) -> list:
    sizes = {fn: Path(fn).stat().st_size for fn in fns}
    bad = [f'{fn}: {s / 1024:.0f} KB > {MAX_ONE // 1024} KB' for fn, s in sizes.items() if s > MAX_ONE]
    total = sum(sizes.values())
    if total > MAX_ALL: bad.append(f'all notebooks: {total / 1024:.0f} KB > {MAX_ALL // 1024} KB')
    for fn in fns:
        for c in json.loads(Path(fn).read_text())['cells']:
            for o in c.get('outputs', []):
                d = o.get('data') or {}
                if 'image/png' in d and ('image/jpeg' in d or 'image/svg+xml' in d): bad.append(f'{fn} cell {c.get("id")}: two formats of one figure')
                if 'text/html' in d and _is_progress(''.join(d['text/html'])): bad.append(f'{fn} cell {c.get("id")}: progress-bar HTML')
    print(f'{len(fns)} notebooks, {total / 1024:.0f} KB in all, largest {max(sizes, key=sizes.get)} '
          f'{max(sizes.values()) / 1024:.0f} KB')
    return bad

if __name__ == '__main__':
    check = '--check' in sys.argv
    fns = [a for a in sys.argv[1:] if a != '--check'] or sorted(glob.glob('nbs/*.ipynb'))
    if not check:
        for fn in fns: shrink(fn)
    bad = report(fns)
    for b in bad: print('too big:', b)
    sys.exit(1 if bad and check else 0)
