"""``atlas.html``: one self-contained page (every image a ``data:`` URI, no script or style from
elsewhere, no server) to browse the atlas by class and by neuron.

Each class is a row of cards along its path (block 0 -> last); each neuron has its own view: its
top probe images with the heatmap over them, its mean activation per class (bars, ± std) and the
share of each class's paths and path JAS that go through it. Views are switched by the URL
fragment (``#class-3``, ``#neuron-0-17``), so links work without any script; a small inline script
only filters the class list.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import atomic_write_text
from .colour import colour_summary
from .figures import png_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .build import Atlas

__all__ = ["write_page", "render_page", "neuron_anchor"]

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;display:flex;color:#222}
nav{width:230px;height:100vh;overflow-y:auto;position:sticky;top:0;background:#f5f5f7;padding:8px;box-sizing:border-box}
nav a{display:block;padding:2px 4px;color:#124;text-decoration:none;border-radius:3px}
nav a:hover{background:#dde}
nav input{width:100%;box-sizing:border-box;margin-bottom:6px}
main{flex:1;padding:12px 20px;min-width:0}
.view{display:none}.view:target{display:block}
#home{display:block}main:has(.view:target) #home{display:none}
.path{display:flex;gap:8px;overflow-x:auto;padding-bottom:6px}
.card{border:1px solid #ccd;border-radius:6px;padding:6px;min-width:128px;background:#fff}
.card h4{margin:0 0 4px;font-size:14px}
.card small,.note{color:#555}
.tile{width:112px;height:112px;image-rendering:pixelated;background-size:cover;margin:2px auto}
.tiles{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;text-align:center;font-size:11px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}
.bar{height:10px;background:#4c72b0;display:inline-block;vertical-align:middle}
.bar.hi{background:#c44e52}.err{color:#777;font-size:11px}
"""

_JS = """
function filt(v){v=v.toLowerCase();document.querySelectorAll('nav a.c').forEach(
a=>{a.style.display=a.textContent.toLowerCase().includes(v)?'':'none'})}
"""


def neuron_anchor(neuron: Any) -> str:
    return f"neuron-{neuron.block}-{neuron.index}"


def _tile_css(atlas: "Atlas") -> str:
    """Every tile once, as a CSS class (a tile shows on several views: its bytes are not repeated)."""
    return "".join(f".t{m}-{r}{{background-image:url(data:image/png;base64,"
                   f"{base64.b64encode(png_bytes(t)).decode()})}}" for (m, r), t in sorted(atlas.tiles.items()))


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _fmt(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"


def _tiles(atlas: "Atlas", m: int, limit: int | None = None) -> list[str]:
    out = []
    a = atlas.acts
    for r, (p, v) in enumerate(zip(a.top_positions[m].tolist(), a.top_values[m].tolist())):
        if p < 0 or (limit is not None and r >= limit):
            continue
        sid = atlas.ids[p]
        label = atlas.class_names[atlas.labels[p]]
        out.append(f'<figure><div class="tile t{m}-{r}" role="img" aria-label="{html.escape(sid)}"></div>'
                   f"<figcaption>{html.escape(label)}<br>{_fmt(v)}</figcaption></figure>")
    return out


def _class_view(atlas: "Atlas", q: int) -> str:
    c = atlas.classes[q]
    cards = []
    for m in atlas.path(q):
        n = atlas.neurons[m]
        users = atlas.top_classes(m)
        cards.append(
            f'<div class="card"><h4><a href="#{neuron_anchor(n)}">{"→ " if cards else ""}{n}</a></h4>'
            + "".join(_tiles(atlas, m, limit=2))
            + f"<small>on {_pct(float(atlas.use.frequency[c, m]))} of paths<br>"
              f"JAS share {_pct(float(atlas.use.jas_share[c, m]))}<br>used most by:<br>"
            + "<br>".join(f"{html.escape(atlas.class_names[u])} {_pct(f)}" for u, f in users)
            + "</small></div>")
    name = html.escape(atlas.class_names[c])
    images = int(atlas.use.images[c])
    return (f'<section class="view" id="class-{c}"><h2>{name}</h2>'
            f'<p class="note">{images} located probe image{"" if images == 1 else "s"}. Its most frequent path neuron per block '
            f'(block {atlas.layers[0]} → {atlas.layers[-1]}); click a neuron for its view.</p>'
            f'<div class="path">{"".join(cards)}</div></section>')


def _neuron_view(atlas: "Atlas", m: int) -> str:
    n = atlas.neurons[m]
    a = atlas.acts
    mean, std = a.mean[:, m], a.std[:, m]
    finite = [c for c in range(len(atlas.class_names)) if math.isfinite(float(mean[c]))]
    order = sorted(finite, key=lambda c: -float(mean[c]))
    top = float(max((abs(float(mean[c])) for c in finite), default=1.0)) or 1.0
    users = set(atlas.users(m))
    rows = []
    for c in order:
        w = 180 * abs(float(mean[c])) / top
        rows.append(f"<tr><td><a href=\"#class-{c}\">{html.escape(atlas.class_names[c])}</a></td>"
                    f"<td>{_fmt(float(mean[c]))} <span class=err>± {_fmt(float(std[c]))}</span></td>"
                    f"<td style=\"text-align:left\"><span class=\"bar{' hi' if c in users else ''}\" "
                    f"style=\"width:{w:.0f}px\"></span></td>"
                    f"<td>{_pct(float(atlas.use.frequency[c, m]))}</td>"
                    f"<td>{_pct(float(atlas.use.jas_share[c, m]))}</td></tr>")
    tiles = _tiles(atlas, m)
    scope = "class-token activation" if a.scope == "cls" else "activation averaged over tokens"
    who = ", ".join(html.escape(atlas.class_names[c]) for c in atlas.users(m)) or "none of the chosen classes"
    return (f'<section class="view" id="{neuron_anchor(n)}"><h2>Neuron {n}</h2>'
            f"<p>Block {n.block}, FFN neuron {n.index}. Path neuron of: {who}.</p>"
            f"<h3>Top {len(tiles)} probe images</h3><p class=note>{scope} below each image; the heatmap "
            f"is the neuron's activation at every patch (one colour scale for the neuron).</p>"
            f'<div class="tiles">{"".join(tiles)}</div>'
            f"<h3>Activation per class</h3><p class=note>Mean ({scope}) over each class's probe images ± std, "
            f"highest first; red bars: classes whose path neuron at block {n.block} it is. 'on paths': share of "
            f"the class's images whose path goes through it; 'JAS share': share of the class's total |path JAS| "
            f"on those paths.</p>"
            "<table><tr><th>class</th><th>mean ± std</th><th></th><th>on paths</th><th>JAS share</th></tr>"
            + "".join(rows) + "</table></section>")


def _home(atlas: "Atlas", shared: dict[str, Any] | None) -> str:
    a = atlas.acts
    parts = [f'<section id="home"><h1>Neuron atlas</h1><p>{len(atlas.classes)} classes, {len(atlas.neurons)} '
             f"neurons, {a.images} probe images; activation = "
             f"{'the class token' if a.scope == 'cls' else 'mean over tokens'} (attribution scope {a.scope}). "
             "Pick a class or a neuron on the left.</p>"]
    if atlas.colour:
        first = [r for r in atlas.colour if r["block"] == atlas.layers[0]]
        parts.append(f"<h3>Colour check (paper Finding 4)</h3><p class=note>Each class's block-{atlas.layers[0]} "
                     "path neuron: mean activation on test images of the class's colour vs the other colours; "
                     "ratio = same / other where the other colours' mean is positive (probe partition in "
                     "brackets).</p><table><tr><th>class</th><th>neuron</th><th>same colour</th>"
                     "<th>other colours</th><th>ratio</th></tr>")
        for r in first:
            parts.append(f"<tr><td>{html.escape(r['class'])}</td><td>{r['neuron']}</td><td>{_fmt(r['test_same'])}</td>"
                         f"<td>{_fmt(r['test_other'])}</td><td>{_fmt(r['test_ratio'])} "
                         f"({_fmt(r['probe_ratio'])})</td></tr>")
        parts.append("</table><p class=note>The same check for every block's path neuron:</p><table><tr>"
                     "<th>block</th><th>classes</th><th>same colour above other</th><th>median ratio</th></tr>")
        for b, v in colour_summary(atlas.colour).items():
            parts.append(f"<tr><td>{b}</td><td>{v['classes']}</td><td>{v['same_above_other']}</td>"
                         f"<td>{_fmt(v['median_ratio'])} (of {v['ratios']})</td></tr>")
        parts.append("</table>")
    if shared:
        parts.append(f"<h3>Shared vs class-specific path neurons</h3><p>{shared['shared']} neurons are the path "
                     f"neuron of several classes, {shared['specific']} of one class only.</p>"
                     "<table><tr><th>neuron</th><th>classes</th><th>which</th></tr>")
        for r in shared["most_shared"]:
            parts.append(f"<tr><td>{r['neuron']}</td><td>{r['classes']}</td>"
                         f"<td style=\"text-align:left\">{html.escape(', '.join(r['names']))}</td></tr>")
        parts.append("</table><table><tr><th>block</th><th>path neurons</th><th>class-specific</th>"
                     "<th>most classes on one neuron</th></tr>")
        for b, v in shared["per_block"].items():
            parts.append(f"<tr><td>{b}</td><td>{v['neurons']}</td><td>{v['specific']}</td>"
                         f"<td>{v['max_classes']}</td></tr>")
        parts.append("</table>")
    parts.append("</section>")
    return "".join(parts)


def render_page(atlas: "Atlas", shared: dict[str, Any] | None = None) -> str:
    """The whole page as one string."""
    nav = ['<nav><input placeholder="filter classes" oninput="filt(this.value)"><b>Classes</b>']
    nav += [f'<a class="c" href="#class-{c}">{html.escape(atlas.class_names[c])}</a>' for c in atlas.classes]
    nav.append("<b>Neurons</b>")
    for m, n in enumerate(atlas.neurons):
        users = atlas.users(m)
        note = (f" · {atlas.class_names[users[0]]}" + (f" +{len(users) - 1}" if len(users) > 1 else "")) if users \
            else " · asked for"
        nav.append(f'<a href="#{neuron_anchor(n)}">{n}<small>{html.escape(note)}</small></a>')
    nav.append("</nav>")
    views = [_class_view(atlas, q) for q in range(len(atlas.classes))]
    views += [_neuron_view(atlas, m) for m in range(len(atlas.neurons))]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>jas-prune neuron atlas</title>"
            f"<style>{_CSS}{_tile_css(atlas)}</style><script>{_JS}</script></head><body>" + "".join(nav)
            + "<main>" + _home(atlas, shared) + "".join(views) + "</main></body></html>\n")


def write_page(atlas: "Atlas", path: str | Path, *, shared: dict[str, Any] | None = None) -> Path:
    """Write ``atlas.html`` atomically."""
    return atomic_write_text(Path(path), render_page(atlas, shared))
