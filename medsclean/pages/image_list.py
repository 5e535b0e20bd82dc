"""The review page's full list: every image with its thumbnail, scores, status and a link to its file.

One ``<table id="image-list">``, grouped by class and ranked most suspicious first. The page's
script (``pages.review_assets``) sorts it by η, memory score, rank or path and filters it by
status (kept, rejected, changed by you) and by class, from the controls above it or from the
address: ``report.html#list?sort=eta-asc&status=rejected&class=bottle``. Without the script the
table reads as it is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import quote

from medsclean.pages.gallery import AUTO, decision, decision_badge, file_link, status
from medsclean.pages.report import escape

__all__ = ["SORTS", "image_list", "list_link"]

SORTS = {"class": "class, then rank in class", "rank": "rank in class (every class's #1 first)",
         "eta-desc": "η, highest first", "eta-asc": "η, lowest first",
         "memory-desc": "memory score, highest first", "memory-asc": "memory score, lowest first",
         "path": "path"}
"""The list's orders: value of the sort control (and of ``#list?sort=``) -> its label."""
LABELS = {0: "normal", 1: "contaminant"}


def list_link(name: str) -> str:
    """The address of the list filtered to class ``name``."""
    return f"#list?class={quote(name, safe='')}"


def _select(name: str, label: str, options: Sequence[tuple[str, str]]) -> str:
    choices = "".join(f'<option value="{escape(value)}">{escape(text)}</option>' for value, text in options)
    return f'<label>{escape(label)} <select id="list-{name}" name="{name}">{choices}</select></label>'


def _controls(rows: Sequence[Mapping], classes: Sequence[str], with_memory: bool) -> str:
    sorts = [(k, v) for k, v in SORTS.items() if with_memory or not k.startswith("memory")]
    statuses = [("all", "all"), ("kept", "kept"), ("rejected", "rejected")]
    if any(decision(r) != AUTO for r in rows):
        statuses.append(("changed", "changed by you"))
    parts = [_select("sort", "Sort by", sorts), _select("status", "Show", statuses)]
    if len(classes) > 1:
        parts.append(_select("class", "Class", [("", "every class"), *((c, c) for c in classes)]))
    parts.append(f'<span id="list-shown" class="note">{len(rows)} images</span>')
    return f'<div class="controls">{" ".join(parts)}</div>'


def _row(rows: Sequence[Mapping], i: int, thumb: str | None, columns: tuple[bool, bool, bool]) -> str:
    """One image's line; ``columns``: (class, memory score, label) shown."""
    several, with_memory, labelled = columns
    row = rows[i]
    memory = row.get("memory_score")
    picture = f'<img src="{thumb}" alt="" loading="lazy">' if thumb else ""
    cells = [f'<td class="thumb">{picture}</td>', f'<td class="num">{escape(row["rank_in_class"])}</td>']
    if several:
        cells.append(f"<td>{escape(row['class'])}</td>")
    cells += [f'<td><span class="path">{escape(row["path"])}</span>{file_link(row)}</td>',
              f'<td class="num">{float(row["eta"]):.6g}</td>']
    if with_memory:
        cells.append(f'<td class="num">{"" if memory is None else f"{float(memory):.6g}"}</td>')
    cells.append(f'<td><span class="badge {status(row)}">{status(row)}</span>{decision_badge(row)}</td>')
    if labelled:
        cells.append(f"<td>{LABELS.get(row.get('label'), '')}</td>")
    data = {"row": i, "class": row["class"], "status": status(row), "decision": decision(row),
            "eta": repr(float(row["eta"])), "memory": "" if memory is None else repr(float(memory)),
            "rank": row["rank_in_class"], "path": row["path"]}
    attributes = " ".join(f'data-{k}="{escape(v)}"' for k, v in data.items())
    return f'<tr id="row-{i}" {attributes}>{"".join(cells)}</tr>'


def image_list(rows: Sequence[Mapping], ranked: Sequence[int], classes: Sequence[str], thumbs: Mapping[int, str],
               labelled: bool) -> str:
    """The list section: controls and one table row per index of ``ranked`` (its order is the default order)."""
    several = len(classes) > 1
    with_memory = any(r.get("memory_score") is not None for r in rows)
    heads = ["", "rank", *(["class"] if several else []), "path", "η", *(["memory score"] if with_memory else []),
             "status", *(["label"] if labelled else [])]
    head = "".join(f"<th>{escape(h)}</th>" for h in heads)
    body = "".join(_row(rows, i, thumbs.get(i), (several, with_memory, labelled)) for i in ranked)
    missing = sum(i not in thumbs for i in ranked)
    note = (f'<p class="note">{missing} of {len(ranked)} images have no thumbnail (no file, unreadable, '
            f"or past the page's limit).</p>" if thumbs and missing else "")
    return (f'<section id="list"><h2>All images</h2>'
            f'<p class="note">Every image of the run with its scores. Sort and filter with the controls '
            f'(a script in this page; it fetches nothing); "open file" opens the original.</p>'
            f'{_controls(rows, classes, with_memory)}{note}'
            f'<table class="scores" id="image-list"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f"</section>")
