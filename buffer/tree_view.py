"""`treepo inspect TREE_ID`: a stored tree as an indented view (rich) with segment text, rewards and versions.

Each segment line: `#id v<policy version> <n> tok <finish>` and its text (decoded with the run's
tokenizer, else its token ids), shortened to `--width` characters, and its advantage when the learner
trained it per segment (TreeRPO); a leaf adds its reward, stop reason, reward details and its advantage
(TreePO, GRPO). The header says at which policy version the learner trained the tree. `--html OUT.html`
writes the tree as a page instead (`buffer.tree_html`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree as RichTree

from buffer.offline_access import TextDecoder, add_store_arguments, open_store, text_decoder
from buffer.store import AdvantageRecord
from buffer.tree_html import tree_html
from protocol.tree import ROOT_ID, STOP_REASONS, Tree


def _short(text: str, width: int) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[:width - 1] + "…"


def render(tree: Tree, decode_text: TextDecoder | None = None, trained: AdvantageRecord | None = None,
           width: int = 80) -> RichTree:
    """The tree as a rich renderable."""
    values = {} if trained is None else trained.values
    leaf_index = {int(n): j for j, n in enumerate(tree.leaf_ids)}
    when = "not trained" if trained is None else f"trained at v{trained.trained_version} ({trained.level} advantages)"
    root = RichTree(f"[bold]{escape(tree.tree_id)}[/] run={escape(tree.run_id)} prompt={escape(tree.prompt_id)} "
                    f"{len(tree.node_ids)} segments, {len(tree.leaf_ids)} leaves, {when}: "
                    f"{escape(_short(tree.prompt_text, width))}")
    kids = tree.children()

    def add(parent: RichTree, node_id: int) -> None:
        seg = tree.segment(node_id)
        ids = seg.token_ids.tolist()
        text = decode_text(ids) if decode_text is not None else " ".join(map(str, ids))
        label = (f"[cyan]#{node_id}[/] v{seg.policy_version} {len(ids)} tok {seg.finish}: "
                 f"{escape(_short(text, width))}")
        adv = f" adv={values[node_id]:+.3f}" if node_id in values else ""
        if trained is not None and trained.level == "segment":
            label += adv
        j = leaf_index.get(node_id)
        if j is not None:
            details = ", ".join(f"{k}={v[j]:g}" for k, v in tree.reward_details.items())
            adv = adv if trained is not None and trained.level == "leaf" else ""
            label += (f"  [bold green]reward={tree.rewards[j]:g}[/] {STOP_REASONS[tree.stop_reasons[j]]}"
                      f"{f' ({details})' if details else ''}{adv}")
        branch = parent.add(label)
        for child in kids.get(node_id, []):
            add(branch, child)

    for child in kids.get(ROOT_ID, []):
        add(root, child)
    return root


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tree_id", help="id of a stored tree")
    add_store_arguments(p)
    p.add_argument("--tokenizer", help="tokenizer directory (default: the run's model directory)")
    p.add_argument("--width", type=int, default=80, help="characters of text shown per segment")
    p.add_argument("--html", metavar="OUT.html", help="write the tree as a self-contained HTML page instead")


def run(args: argparse.Namespace) -> int:
    cfg, handle, store = open_store(args)
    with handle:
        tree = store.load(args.tree_id)
        if tree is None:
            print(f"no tree {args.tree_id!r} in run {store.run_id!r}")
            return 1
        decode_text, trained = text_decoder(cfg, args.tokenizer), store.advantages(args.tree_id)
        if args.html:
            Path(args.html).write_text(tree_html(tree, decode_text, trained))
            print(f"wrote tree {args.tree_id!r} ({len(tree.node_ids)} segments) to {args.html}")
        else:
            Console(width=max(120, args.width + 60)).print(render(tree, decode_text, trained, args.width))
    return 0
