"""`treepo inspect TREE_ID --html OUT.html`: one stored tree as a self-contained HTML page (inline SVG, no
scripts, no external files).

Layout: the root (the prompt) on the left, one column per depth; every leaf gets its own row and an
inner segment sits at the mean height of its children. A segment is a box labelled `#id v<version>`
with its advantage when the learner trained it (segment level, TreeRPO); hovering shows its decoded
text, token count and finish. A leaf box is coloured by its reward (red = the tree's lowest, green =
its highest) and labelled with reward and advantage (leaf level, TreePO/GRPO). The header gives the
prompt, the reward range and the policy version the learner trained the tree at. The page is
well-formed XML, so it parses as XHTML as well as HTML.
"""

from __future__ import annotations

from html import escape

from buffer.offline_access import TextDecoder
from buffer.store import AdvantageRecord
from protocol.tree import ROOT_ID, STOP_REASONS, Tree

COLUMN, ROW, BOX_W, BOX_H, MARGIN = 190, 34, 150, 24, 20


def _reward_colour(r: float, lo: float, hi: float) -> str:
    """Red (lo) through yellow to green (hi)."""
    t = 0.5 if hi == lo else (r - lo) / (hi - lo)
    return f"hsl({120 * t:.0f}, 70%, 62%)"


def _layout(tree: Tree) -> dict[int, tuple[int, float]]:
    """node id -> (depth, row): leaves on rows 0.. in depth-first order, an inner node at its children's mean."""
    kids = tree.children()
    place: dict[int, tuple[int, float]] = {}
    next_row = 0

    def visit(node: int, depth: int) -> float:
        nonlocal next_row
        children = kids.get(node, [])
        if not children:
            row = float(next_row)
            next_row += 1
        else:
            rows = [visit(c, depth + 1) for c in children]
            row = sum(rows) / len(rows)
        place[node] = (depth, row)
        return row

    visit(ROOT_ID, 0)
    return place


def tree_html(tree: Tree, decode_text: TextDecoder | None = None, trained: AdvantageRecord | None = None) -> str:
    """The page (see the module docstring)."""
    place = _layout(tree)
    leaf_index = {int(n): j for j, n in enumerate(tree.leaf_ids)}
    lo, hi = (float(tree.rewards.min()), float(tree.rewards.max())) if len(tree.rewards) else (0.0, 0.0)
    depth = max(d for d, _ in place.values())
    rows = max(1.0, max(r for _, r in place.values()) + 1)
    width, height = 2 * MARGIN + depth * COLUMN + BOX_W, 2 * MARGIN + rows * ROW

    def centre(node: int) -> tuple[float, float]:
        d, r = place[node]
        return MARGIN + d * COLUMN, MARGIN + r * ROW + BOX_H / 2

    parts = []
    for node, parent in zip(tree.node_ids.tolist(), tree.parent_ids.tolist(), strict=True):
        (x1, y1), (x2, y2) = centre(parent), centre(node)
        parts.append(f'<line x1="{x1 + BOX_W:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" stroke="#999"/>')
    x, y = centre(ROOT_ID)
    parts.append(f'<g id="node-root"><title>{escape(tree.prompt_text)}</title>'
                 f'<rect x="{x:.0f}" y="{y - BOX_H / 2:.0f}" width="{BOX_W}" height="{BOX_H}" rx="4" fill="#dde"/>'
                 f'<text x="{x + 6:.0f}" y="{y + 4:.0f}">prompt</text></g>')
    for node in tree.node_ids.tolist():
        seg = tree.segment(node)
        ids = seg.token_ids.tolist()
        text = decode_text(ids) if decode_text is not None else " ".join(map(str, ids))
        label = f"#{node} v{seg.policy_version}"
        hover = f"#{node}: {len(ids)} tokens, policy version {seg.policy_version}, {seg.finish}\n{text}"
        fill = "#eef"
        value = None if trained is None else trained.values.get(node)
        if value is not None and trained.level == "segment":
            label += f" A={value:+.2f}"
        j = leaf_index.get(node)
        if j is not None:
            reward = float(tree.rewards[j])
            fill = _reward_colour(reward, lo, hi)
            label += f" r={reward:g}"
            if value is not None and trained.level == "leaf":
                label += f" A={value:+.2f}"
            hover += f"\nreward {reward:g} ({STOP_REASONS[tree.stop_reasons[j]]})"
        if value is not None:
            hover += f"\nadvantage {value:+.4f}"
        x, y = centre(node)
        parts.append(f'<g id="node-{node}"><title>{escape(hover)}</title>'
                     f'<rect x="{x:.0f}" y="{y - BOX_H / 2:.0f}" width="{BOX_W}" height="{BOX_H}" rx="4" '
                     f'fill="{fill}" stroke="#557"/><text x="{x + 6:.0f}" y="{y + 4:.0f}">{escape(label)}</text></g>')
    trained_line = ("not trained (no advantages saved)" if trained is None else
                    f"trained at policy version {trained.trained_version}, {trained.level}-level advantages (A)")
    return (
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\"><head><meta charset=\"utf-8\"/>"
        f"<title>tree {escape(tree.tree_id)}</title><style>body{{font-family:sans-serif}} "
        "svg text{font-size:12px;font-family:monospace;pointer-events:none}</style></head><body>"
        f"<h2>tree {escape(tree.tree_id)} (run {escape(tree.run_id)}, prompt {escape(tree.prompt_id)})</h2>"
        f"<p>{len(tree.node_ids)} segments, {len(tree.leaf_ids)} leaves, rewards {lo:g} (red) to {hi:g} (green); "
        f"{trained_line}. Hover a box for its text.</p><pre>{escape(tree.prompt_text)}</pre>"
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}">'
        + "".join(parts) + "</svg></body></html>\n")
